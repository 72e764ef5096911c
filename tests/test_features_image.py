"""Image modality: CLIP on generated images (folder and CSV), missing-image masks, feature files."""

import json

import numpy as np
import pytest
import torch

from speeder_fast.features.image import (
    CLIPImageEncoder,
    build_image_features,
    image_encoder_id,
    image_paths,
    load_feature_file,
)

ITEMS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    d = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=8)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def _img(path, color, size=(40, 36)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


@pytest.fixture
def image_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _img(d / "a.jpg", (255, 0, 0))
    _img(d / "c.png", (0, 255, 0))
    _img(d / "d.webp", (0, 0, 255))
    _img(d / "zzz.jpg", (9, 9, 9))  # not an item of the dataset
    (d / "notes.txt").write_text("ignored")
    return d


def test_image_paths_folder_and_csv(image_folder, tmp_path):
    found = image_paths(image_folder, ITEMS)
    assert sorted(found) == [0, 2, 3]
    assert found[3].name == "d.webp"
    csv = tmp_path / "map.csv"
    csv.write_text("item_id,path\nb,imgs/a.jpg\ne,%s\nunknown,imgs/a.jpg\n" % (image_folder / "c.png"))
    found = image_paths(csv, ITEMS)
    assert sorted(found) == [1, 4] and found[1] == tmp_path / "imgs" / "a.jpg"
    bad = tmp_path / "bad.csv"
    bad.write_text("b,imgs/missing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"bad.csv:1"):
        image_paths(bad, ITEMS)
    dup = tmp_path / "dup.csv"
    dup.write_text("b,imgs/a.jpg\nb,imgs/c.png\n")
    with pytest.raises(ValueError, match=r"dup.csv:2: item_id 'b' listed twice"):
        image_paths(dup, ITEMS)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        image_paths(tmp_path / "nothing", ITEMS)


def test_clip_features_match_direct_model_and_missing_images_are_masked(clip_dir, image_folder):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    feats, mask = build_image_features(image_folder, ITEMS, clip_dir, batch_size=2, progress=False)
    assert feats.shape == (5, 8)
    assert mask.tolist() == [True, False, True, True, False]
    assert torch.count_nonzero(feats[~mask]) == 0
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        want = model(**proc(images=[Image.open(image_folder / "c.png").convert("RGB")],
                            return_tensors="pt")).image_embeds[0]
    assert torch.allclose(feats[2], want, atol=1e-5)
    assert not torch.allclose(feats[0], feats[2])  # different images -> different features
    again, _ = build_image_features(image_folder, ITEMS, clip_dir, batch_size=3, progress=False)
    assert torch.allclose(feats, again, atol=1e-5)


def test_clip_without_projection_falls_back_to_pooled_output(tmp_path, image_folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=8)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "vis")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vis")
    enc = CLIPImageEncoder(tmp_path / "vis")
    assert enc.output == "pooler_output" and enc.dim == 16
    out = enc.encode_files([image_folder / "a.jpg"], progress=False)
    assert out.shape == (1, 16)


def test_unreadable_image_names_the_file(clip_dir, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*a\.jpg"):
        build_image_features(d, ITEMS, clip_dir, progress=False)


def test_image_files_need_an_encoder(image_folder):
    with pytest.raises(ValueError, match="image_encoder"):
        build_image_features(image_folder, ITEMS, "", progress=False)
    with pytest.raises(ValueError, match="image_encoder"):
        image_encoder_id(image_folder, "")


def test_npy_feature_file_with_txt_and_json_ids(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "f.npy", arr)
    (tmp_path / "f.ids.txt").write_text("c\na\nnot_an_item\n")
    feats, mask = load_feature_file(tmp_path / "f.npy", ITEMS)
    assert mask.tolist() == [True, False, True, False, False]
    assert torch.equal(feats[2], torch.tensor(arr[0])) and torch.equal(feats[0], torch.tensor(arr[1]))
    assert torch.count_nonzero(feats[~mask]) == 0
    np.save(tmp_path / "g.npy", arr)
    (tmp_path / "g.json").write_text(json.dumps(["e", "d", "b"]))
    feats, mask = load_feature_file(tmp_path / "g.npy", ITEMS)
    assert mask.tolist() == [False, True, False, True, True]
    assert torch.equal(feats[4], torch.tensor(arr[0]))


def test_safetensors_feature_file_with_metadata_ids(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(2, 6)
    save_file({"features": t}, str(tmp_path / "f.safetensors"), metadata={"item_ids": json.dumps(["b", "d"])})
    feats, mask = load_feature_file(tmp_path / "f.safetensors", ITEMS)
    assert mask.tolist() == [False, True, False, True, False]
    assert torch.equal(feats[3], t[1])
    # a sidecar list works for safetensors too, and build_image_features dispatches on the suffix
    save_file({"x": t}, str(tmp_path / "g.safetensors"))
    (tmp_path / "g.txt").write_text("a\nb\n")
    feats, mask = build_image_features(tmp_path / "g.safetensors", ITEMS, progress=False)
    assert mask.tolist() == [True, True, False, False, False]
    assert image_encoder_id(tmp_path / "g.safetensors").startswith("file:g.safetensors:")


def test_feature_file_errors(tmp_path):
    arr = np.zeros((2, 3), dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(FileNotFoundError, match="no item-id list"):
        load_feature_file(tmp_path / "a.npy", ITEMS)
    (tmp_path / "a.txt").write_text("a\n")
    with pytest.raises(ValueError, match="2 feature rows but 1 item ids"):
        load_feature_file(tmp_path / "a.npy", ITEMS)
    (tmp_path / "a.txt").write_text("a\na\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_feature_file(tmp_path / "a.npy", ITEMS)
    arr[1, 2] = np.nan
    np.save(tmp_path / "a.npy", arr)
    (tmp_path / "a.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"non-finite value in row 1 \(item 'b'\)"):
        load_feature_file(tmp_path / "a.npy", ITEMS)
    np.save(tmp_path / "v.npy", np.zeros(3, dtype=np.float32))
    (tmp_path / "v.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="2-D"):
        load_feature_file(tmp_path / "v.npy", ITEMS)
