"""Copy the SmolLM2 tokenizer + config (NO weights) into ``.gpu_assets/smollm2`` for a GPU run.

The GPU machine cannot download anything and the 517 MB weights are too big to carry; speed does
not depend on weight values, so ``benchmarks/gpu_check.sh`` builds seeded random weights from this
config (``speeder_fast.profile.materialize_model_dir``) and uses the real tokenizer::

    python benchmarks/prepare_gpu_assets.py                 # -> .gpu_assets/smollm2 (~3.5 MB)
    python benchmarks/prepare_gpu_assets.py --src DIR --out DIR

The destination must be git-ignored (``echo /.gpu_assets/ >> .git/info/exclude``) and carried
(``carry: [".whl", ".gpu_data", ".gpu_assets"]``); the script warns when it is not ignored.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def copy_assets(src: Path, out: Path) -> list[str]:
    """Copy tokenizer/config files of ``src`` into ``out`` (replaced atomically); returns the names."""
    if not (src / "config.json").is_file() or not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{src}: needs config.json and a tokenizer (tokenizer.json or tokenizer.model)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied = []
    for f in FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
            copied.append(f)
    (tmp / "SOURCE.json").write_text(json.dumps({"source": str(src), "files": copied,
                                                 "note": "tokenizer + config only; weights are random on the GPU"}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="", help="model folder (default: the offline SmolLM2-135M asset)")
    ap.add_argument("--out", default=str(ROOT / ".gpu_assets" / "smollm2"))
    args = ap.parse_args(argv)
    if args.src:
        src = Path(args.src)
    else:
        from speeder_fast.assets import resolve_model

        src = Path(resolve_model("smollm2-135m"))
    out = Path(args.out)
    copied = copy_assets(src, out)
    size = sum((out / f).stat().st_size for f in copied) / 2**20
    print(f"copied {len(copied)} files ({size:.1f} MB) from {src} to {out}: {', '.join(copied)}")
    ignored = True
    if out.resolve().is_relative_to(ROOT):
        try:
            ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(out.resolve())], check=False,
                                     stderr=subprocess.DEVNULL).returncode == 0
        except OSError:
            pass
    if not ignored:
        print(f"warning: {out} is not git-ignored; run: echo /.gpu_assets/ >> .git/info/exclude", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
