#!/usr/bin/env python3
"""GPU side-by-side: tuwen on CUDA against PyTorch eager (with `sdpa` attention) on the same
GPU, both in bf16, on the same shapes and random weights.

In one invocation, alternating between the two, each workload runs at the given batch: PyTorch
through HF transformers (`attn_implementation="sdpa"`, `torch.inference_mode()`), and the Rust
timing binary `benches/compare.rs` (built with `cargo bench --features cuda --bench compare
--no-run`) with `--device cuda --dtype bf16`. Both synchronise the device after every pass.
Prints and writes a Markdown table (throughput in items per second, ratio ours / PyTorch time)
and the raw JSON lines.

    python3 benches/compare_pytorch_gpu.py --bin path/to/compare --batch 64 --out gpu.md

The PyTorch side of each workload is that of `compare_pytorch.py`, moved to the GPU in bf16.
"""
import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time

TEXT_LEN = 64


def build(name, batch):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    dev, dt = "cuda", torch.bfloat16

    def ready(m):
        return m.to(dev, dt).eval()

    if name in ("siglip2-b16-image", "siglip2-b16-text"):
        from transformers import SiglipConfig, SiglipModel

        cfg = SiglipConfig(
            text_config=dict(vocab_size=256000, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=64),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16),
        )
        m = ready(SiglipModel._from_config(cfg, attn_implementation="sdpa"))
        if name.endswith("image"):
            px = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
            return m, lambda: m.get_image_features(pixel_values=px)
        ids = torch.ones(batch, TEXT_LEN, dtype=torch.long, device=dev)
        return m, lambda: m.get_text_features(input_ids=ids)
    if name == "r2d2-vitl14-image":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14,
                               hidden_act="quick_gelu")
        vit = ready(CLIPVisionModel._from_config(cfg, attn_implementation="sdpa"))
        proj = ready(nn.Linear(1024, 768))
        px = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
        return vit, lambda: F.normalize(proj(vit(pixel_values=px).last_hidden_state[:, 0]), dim=-1)
    if name == "r2d2-bert-text":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512, layer_norm_eps=1e-12)
        bert = ready(BertModel._from_config(cfg, add_pooling_layer=False,
                                            attn_implementation="sdpa"))
        proj = ready(nn.Linear(768, 768))
        ids = torch.ones(batch, TEXT_LEN, dtype=torch.long, device=dev)
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.long, device=dev)
        return bert, lambda: F.normalize(
            proj(bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
    raise SystemExit(f"unknown workload {name}")


def time_torch(name, batch, iters, warmup):
    import torch

    model, fn = build(name, batch)
    attn = getattr(model.config, "_attn_implementation", "?")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    del model, fn
    torch.cuda.empty_cache()
    return statistics.median(times), attn


def time_ours(binary, name, batch, iters, warmup):
    out = subprocess.run(
        [binary, "--workload", name, "--batch", str(batch), "--iters", str(iters),
         "--warmup", str(warmup), "--device", "cuda", "--dtype", "bf16"],
        check=True, capture_output=True, text=True,
    )
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the compare bench binary (CUDA build)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workloads", nargs="*",
                    default=["siglip2-b16-image", "r2d2-vitl14-image", "siglip2-b16-text",
                             "r2d2-bert-text"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    rows, raw = [], []
    for name in args.workloads:
        ours = time_ours(args.bin, name, args.batch, args.iters, args.warmup)
        t_torch, attn = time_torch(name, args.batch, args.iters, args.warmup)
        # A second round in the other order, keeping the better of each.
        t_torch2, _ = time_torch(name, args.batch, args.iters, args.warmup)
        ours2 = time_ours(args.bin, name, args.batch, args.iters, args.warmup)
        t_ours = min(ours["median_s"], ours2["median_s"])
        t_torch = min(t_torch, t_torch2)
        raw += [ours, ours2]
        rows.append((name, args.batch, args.batch / t_torch, args.batch / t_ours,
                     t_ours / t_torch, attn))
        print(f"{name}: torch {t_torch * 1e3:.2f} ms, ours {t_ours * 1e3:.2f} ms, "
              f"ratio {t_ours / t_torch:.3f}", flush=True)

    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"GPU {gpu}, bf16, batch {args.batch}; PyTorch {torch.__version__} eager "
        f"(transformers, attention `{rows[0][5] if rows else '?'}`), CUDA {torch.version.cuda}; "
        f"{platform.node()}, {datetime.date.today()}; median of {args.iters} passes after "
        f"{args.warmup} warm-ups, best of two alternating rounds.",
        "",
        "| workload | batch | PyTorch items/s | tuwen items/s | time ratio (tuwen / PyTorch) |",
        "|---|---|---|---|---|",
    ]
    for name, b, tp, to, r, _ in rows:
        lines.append(f"| {name} | {b} | {tp:.0f} | {to:.0f} | **{r:.2f}** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out + ".jsonl", "w") as f:
            for r in raw:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
