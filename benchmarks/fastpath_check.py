"""Fast LLM path check: a Llama-2-7B-shaped model (random weights) with LoRA, padded vs packed.

Measures, for ~110-token prompts at batch 64, training ms/sample (LoRA on a bf16 base and QLoRA on
an NF4 base), inference ms/sample (forward to the answer-position logits only), MFU and peak
memory, for these variants (run in this order on one model per precision):

* ``hf_full_logits`` -- padded batch, transformers SDPA, HF causal-LM forward with ``labels``
  (full ``[B, L, V]`` logits and loss over the shifted labels): the stock path.
* ``sdpa_padded``    -- padded batch, transformers SDPA, decoder body + answer-row loss
  (:func:`speeder_fast.model.loss.answer_token_loss`): only the answer rows hit ``lm_head``.
* ``packed_varlen``  -- padding-free packed row, ``speeder_varlen`` attention chosen by
  :func:`speeder_fast.model.attention.select_attention` ("auto"), answer-row loss.
* ``packed_liger``   -- as ``packed_varlen`` + liger RMSNorm/RoPE/SwiGLU and liger's fused linear
  cross-entropy for the answer rows.

FLOPs (MFU): training = 4 x N_body x real tokens + 4 x N_head x answer rows (frozen base: forward +
activation gradients; LoRA weight gradients and attention score FLOPs are ignored, ~1-2% here);
inference = 2 x N_body x real tokens + 2 x N_head x B. ``N_body`` counts the decoder's linear weights
(embedding lookups cost no FLOPs). Padding is not counted as useful work, so padded variants show
their waste as lower MFU. MFU is reported against the card's dense bf16 spec peak and against
790 TFLOP/s (the measured achievable figure quoted in the issue).

    python benchmarks/fastpath_check.py --out runs/bench/fastpath.json          # GPU, ~2-3 min
    python benchmarks/fastpath_check.py --layers 4 --out /tmp/quick.json         # quick GPU check
    python benchmarks/fastpath_check.py --layers 2 --hidden 256 --device cpu     # CPU smoke run

Without CUDA (and without ``--device cpu``) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench_utils import Timer, card_name, peak_memory_gb, peak_tflops, reset_peak_memory, versions  # noqa: E402

VARIANTS = ("hf_full_logits", "sdpa_padded", "packed_varlen", "packed_liger")
ACHIEVABLE_TFLOPS = 790.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------- data


def make_batch(args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    """Padded ids/mask/labels; lengths uniform in prompt_len +- jitter; the last ``answer_len``
    real tokens of each prompt are the answer."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(args.answer_len + 1, args.prompt_len - args.len_jitter), args.prompt_len + args.len_jitter
    lens = torch.randint(lo, hi + 1, (args.batch,), generator=g)
    length = int(lens.max())
    ids = torch.randint(3, args.vocab, (args.batch, length), generator=g)
    j = torch.arange(length)[None]
    mask = j < lens[:, None]
    ids = ids.masked_fill(~mask, 0)
    answer = mask & (j >= (lens[:, None] - args.answer_len))
    labels = torch.where(answer, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels, "lengths": lens}


# -------------------------------------------------------------------------------------------- model


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=4096, use_cache=False, tie_word_embeddings=False)


def body_params(cfg) -> int:
    """Linear weights of the decoder body (what every token multiplies through)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = h // cfg.num_attention_heads
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2
    return cfg.num_hidden_layers * (attn + 3 * h * i)


def quantize_nf4(model, compute_dtype: torch.dtype) -> int:
    """Replace the decoder's linear layers by bitsandbytes NF4 ``Linear4bit`` (double quantization),
    layer by layer (peak memory = the bf16 model). Returns the number of layers converted."""
    import bitsandbytes as bnb

    n = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                w = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                      quant_type="nf4")
                q.weight = w.to(lin.weight.device)  # quantizes
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del lin
                n += 1
    model.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layer on this flag
    return n


def build_model(args: argparse.Namespace, precision: str, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    import speeder_fast.model.attention  # noqa: F401  (registers speeder_varlen*)

    torch.manual_seed(args.seed)
    cfg = llama_config(args)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    if precision == "nf4":
        quantize_nf4(model, dtype)
    model.requires_grad_(False)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none")
    model = get_peft_model(model, lora)
    for n, p in model.named_parameters():  # LoRA weights in the compute dtype (peft may keep fp32)
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


# ------------------------------------------------------------------------------------------ variants


def make_steps(model, variant: str, batch: dict, device: torch.device, use_liger: bool):
    """(train_step, infer_step, n_real_tokens, n_answer_rows) closures for one variant."""
    from speeder_fast.model.liger import unwrap_model
    from speeder_fast.model.loss import answer_indices, answer_token_loss, gather_answer_hidden
    from speeder_fast.model.packing import pack_padded

    base = unwrap_model(model)
    decoder, lm_head, embed = base.model, base.lm_head, base.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_tokens = int(mask.sum())

    if variant in ("hf_full_logits", "sdpa_padded"):
        ids_d, mask_d, labels_d = ids.to(device), mask.to(device), labels.to(device)
        idx, tgt = answer_indices(labels)
        idx, tgt = idx.to(device), tgt.to(device)
        last = (batch["lengths"] - 1).to(device)
        rows_b = torch.arange(ids.shape[0], device=device)

        def hidden():
            emb = embed(ids_d).detach().requires_grad_(model.training)
            return decoder(inputs_embeds=emb, attention_mask=mask_d, use_cache=False).last_hidden_state

        if variant == "hf_full_logits":
            def loss_fn():
                emb = embed(ids_d).detach().requires_grad_(True)
                return model(inputs_embeds=emb, attention_mask=mask_d, labels=labels_d, use_cache=False).loss
        else:
            def loss_fn():
                rows, t = gather_answer_hidden(hidden(), index=idx, targets=tgt)
                return answer_token_loss(rows, lm_head.weight, t)

        def infer():
            h = hidden()
            return lm_head(h[rows_b, last])  # [B, V] answer-position logits
    else:
        pb = pack_padded(ids, mask, labels)
        idx, tgt = answer_indices(pb.extras[0], cu_seqlens=pb.cu_seqlens)
        pbd = pb.to(device)
        idx, tgt = idx.to(device), tgt.to(device)
        kw = pbd.model_kwargs()
        last = pbd.last_positions()

        def hidden():
            emb = embed(pbd.input_ids).detach().requires_grad_(model.training)
            return decoder(inputs_embeds=emb, use_cache=False, **kw).last_hidden_state

        def loss_fn():
            rows, t = gather_answer_hidden(hidden(), index=idx, targets=tgt)
            return answer_token_loss(rows, lm_head.weight, t, use_liger=use_liger)

        def infer():
            h = hidden()
            return lm_head(h[0, last])

    def train_step():
        model.train()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def infer_step():
        model.eval()
        with torch.inference_mode():
            return infer()

    n_answer = int(tgt.numel())
    return train_step, infer_step, n_tokens, n_answer


def run_precision(args, precision: str, device: torch.device, dtype: torch.dtype, deadline: float,
                  results: list, skipped: list) -> None:
    from speeder_fast.model.attention import select_attention
    from speeder_fast.model.liger import apply_liger, liger_available, restore_liger_globals, unwrap_model

    t0 = time.perf_counter()
    model = build_model(args, precision, device, dtype)
    build_s = time.perf_counter() - t0
    cfg = unwrap_model(model).config
    n_body, n_head = body_params(cfg), cfg.vocab_size * cfg.hidden_size
    batch = make_batch(args, args.seed)
    timer = Timer(device)
    peak = peak_tflops(card_name(device), "bf16") if device.type == "cuda" else None
    liger_done = False
    plabel = precision if precision == "nf4" else str(dtype).replace("torch.", "")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    snapshot = {n: p.detach().clone() for n, p in trainable.items()}  # every variant starts from these
    try:
        for variant in args.variants:
            label = f"{plabel}/{variant}"
            if time.perf_counter() > deadline:
                skipped.append({"run": label, "why": f"time budget ({args.time_budget:.0f}s) spent"})
                continue
            use_liger = False
            if variant in ("hf_full_logits", "sdpa_padded"):
                impl = "sdpa"
            else:
                impl = select_attention(args.attn, device, dtype=dtype)
            if variant == "packed_liger":
                if device.type != "cuda" or not liger_available():
                    why = "needs CUDA" if device.type != "cuda" else "liger-kernel not installed"
                    skipped.append({"run": label, "why": why})
                    continue
                if not liger_done:
                    liger_done = apply_liger(model, "on")
                use_liger = True
            unwrap_model(model).set_attn_implementation(impl)
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(snapshot[n])
            try:
                train_step, infer_step, n_tok, n_ans = make_steps(model, variant, batch, device, use_liger)
                reset_peak_memory(device)
                loss0 = float(train_step())  # first warm-up step: same weights for every variant
                t_train, _ = timer(train_step, max(0, args.warmup - 1), args.steps)
                mem_train = peak_memory_gb(device)
                reset_peak_memory(device)
                t_inf, _ = timer(infer_step, args.warmup, args.steps)
                mem_inf = peak_memory_gb(device)
            except torch.cuda.OutOfMemoryError as e:
                skipped.append({"run": label, "why": f"CUDA OOM: {str(e).splitlines()[0]}"})
                reset_peak_memory(device)
                continue
            train_flops = 4 * n_body * n_tok + 4 * n_head * n_ans
            inf_flops = 2 * n_body * n_tok + 2 * n_head * args.batch
            row = {
                "precision": plabel, "variant": variant, "attn_impl": impl, "liger": use_liger,
                "batch": args.batch, "real_tokens": n_tok, "padded_tokens": int(batch["input_ids"].numel()),
                "answer_rows": n_ans, "loss": loss0,
                "train_ms_per_sample": 1000 * t_train / args.batch,
                "train_tokens_per_s": n_tok / t_train,
                "train_tflops": train_flops / t_train / 1e12,
                "train_peak_mem_gb": mem_train,
                "infer_ms_per_sample": 1000 * t_inf / args.batch,
                "infer_tflops": inf_flops / t_inf / 1e12,
                "infer_peak_mem_gb": mem_inf,
                "build_s": build_s,
            }
            for k in ("train", "infer"):
                tf = row[f"{k}_tflops"]
                row[f"{k}_mfu_spec"] = tf / peak if peak else None
                row[f"{k}_mfu_vs_790"] = tf / ACHIEVABLE_TFLOPS if device.type == "cuda" else None
            results.append(row)
            print(f"  {label:28s} train {row['train_ms_per_sample']:8.3f} ms/sample  infer "
                  f"{row['infer_ms_per_sample']:8.3f} ms/sample  loss {row['loss']:.4f}", flush=True)
    finally:
        restore_liger_globals()
        del model
        gc.collect()
        reset_peak_memory(device)


def markdown(results: list, skipped: list, meta: dict) -> str:
    def f(x, nd=2, pct=False):
        if x is None:
            return "-"
        return f"{100 * x:.1f}%" if pct else f"{x:.{nd}f}"

    head = ("| precision | variant | attention | liger | train ms/sample | train MFU (spec) | train MFU (vs 790) "
            "| train peak GB | infer ms/sample | infer MFU (spec) | infer peak GB | step-0 loss |")
    lines = [f"Device: {meta['device']} ({meta['dtype']}); model: {meta['shape']}; batch {meta['batch']}, "
             f"prompt {meta['prompt']} tokens; LoRA r={meta['lora_r']}", "", head,
             "|" + "---|" * 12]
    for r in results:
        lines.append(f"| {r['precision']} | {r['variant']} | {r['attn_impl']} | {'yes' if r['liger'] else 'no'} | "
                     f"{f(r['train_ms_per_sample'], 3)} | {f(r['train_mfu_spec'], pct=True)} | "
                     f"{f(r['train_mfu_vs_790'], pct=True)} | {f(r['train_peak_mem_gb'], 1)} | "
                     f"{f(r['infer_ms_per_sample'], 3)} | {f(r['infer_mfu_spec'], pct=True)} | "
                     f"{f(r['infer_peak_mem_gb'], 1)} | {r['loss']:.4f} |")
    for s in skipped:
        lines.append(f"\nskipped {s['run']}: {s['why']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="write results JSON here (atomic)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=0, help="default: hidden // 128")
    p.add_argument("--kv-heads", type=int, default=0, help="default: = heads (Llama-2-7B has no GQA)")
    p.add_argument("--intermediate", type=int, default=0, help="default: 11008 x hidden / 4096, multiple of 64")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=110)
    p.add_argument("--len-jitter", type=int, default=20, help="prompt lengths uniform in prompt_len +- jitter")
    p.add_argument("--answer-len", type=int, default=2, help="answer tokens per prompt (loss rows)")
    p.add_argument("--precisions", default="bf16,nf4", help="comma list of bf16, nf4")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--attn", default="auto", help="attention request for the packed variants (auto|flash|varlen|sdpa)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=170.0, help="seconds; later runs are skipped past it")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.heads = a.heads or max(1, a.hidden // 128)
    a.kv_heads = a.kv_heads or a.heads
    a.intermediate = a.intermediate or max(64, int(round(11008 * a.hidden / 4096 / 64)) * 64)
    a.precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    a.variants = [x.strip() for x in a.variants.split(",") if x.strip()]
    for x in a.precisions:
        if x not in ("bf16", "nf4"):
            p.error(f"--precisions: unknown {x!r}")
    for x in a.variants:
        if x not in VARIANTS:
            p.error(f"--variants: unknown {x!r}")
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        if not torch.cuda.is_available():
            print("fastpath_check: no CUDA device, nothing measured (use --device cpu for a smoke run)")
            if args.out:
                from speeder_fast.utils import atomic_write_json

                atomic_write_json(args.out, {"skipped": "no CUDA device"})
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastpath_check: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    deadline = time.perf_counter() + args.time_budget
    results: list = []
    skipped: list = []
    meta = {
        "device": card_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": f"llama h{args.hidden} L{args.layers} heads{args.heads}/{args.kv_heads} i{args.intermediate} "
                 f"v{args.vocab}",
        "batch": args.batch, "prompt": f"{args.prompt_len}+-{args.len_jitter}", "lora_r": args.lora_r,
        "versions": versions(),
        "peak_bf16_tflops": peak_tflops(card_name(device), "bf16") if device.type == "cuda" else None,
        "achievable_tflops": ACHIEVABLE_TFLOPS,
        "args": {k: v for k, v in vars(args).items()},
    }
    print(f"fastpath_check on {meta['device']}: {meta['shape']}, batch {args.batch}", flush=True)
    for precision in args.precisions:
        if precision == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except Exception as e:
                skipped.append({"run": "nf4/*", "why": f"bitsandbytes unavailable ({type(e).__name__}: {e})"})
                continue
        if time.perf_counter() > deadline:
            skipped.append({"run": f"{precision}/*", "why": "time budget spent"})
            continue
        try:
            run_precision(args, precision, device, dtype, deadline, results, skipped)
        except torch.cuda.OutOfMemoryError as e:
            skipped.append({"run": f"{precision}/*", "why": f"CUDA OOM building the model: {str(e).splitlines()[0]}"})
    table = markdown(results, skipped, meta)
    print(table)
    if args.out:
        from speeder_fast.utils import atomic_write_json

        atomic_write_json(args.out, {"meta": meta, "results": results, "skipped": skipped, "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
