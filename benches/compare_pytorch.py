#!/usr/bin/env python3
"""Side-by-side timing of tuwen against PyTorch (HF transformers / timm) on the same shapes.

Runs, in one invocation and alternating between the two, each workload at the given batch
sizes: PyTorch on CPU with the same thread count, fp32, `torch.inference_mode()`, random
weights; and the Rust timing binary `benches/compare.rs` (built with `cargo bench --bench
compare --no-run`). Writes a ratio table (ours / PyTorch, lower is better) to
benches/RESULTS.md with the machine, versions and date.

    python3 benches/compare_pytorch.py --threads 2 --batches 1 8 --iters 5
"""
import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def torch_workload(name, batch):
    from transformers import SiglipConfig, SiglipModel, Siglip2Config, Siglip2Model

    if name in ("siglip2-b16-image", "siglip2-b16-text"):
        cfg = SiglipConfig(
            text_config=dict(vocab_size=256000, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16),
        )
        m = SiglipModel(cfg).eval()
        if name.endswith("image"):
            px = torch.randn(batch, 3, 224, 224)
            return lambda: m.get_image_features(pixel_values=px)
        ids = torch.ones(batch, 64, dtype=torch.long)
        return lambda: m.get_text_features(input_ids=ids)
    if name == "siglip2-b16-naflex-image":
        cfg = Siglip2Config(
            text_config=dict(vocab_size=256000, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, patch_size=16, num_patches=256),
        )
        m = Siglip2Model(cfg).eval()
        px = torch.randn(batch, 256, 768)
        mask = torch.ones(batch, 256, dtype=torch.long)
        shapes = torch.tensor([[16, 16]] * batch)
        return lambda: m.get_image_features(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes)
    raise ValueError(name)


def time_torch(name, batch, iters):
    fn = torch_workload(name, batch)
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def rust_binary():
    cands = [p for p in glob.glob("target/release/deps/compare-*") if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not cands:
        subprocess.run(["cargo", "bench", "--bench", "compare", "--no-run"], check=True)
        cands = [p for p in glob.glob("target/release/deps/compare-*") if os.access(p, os.X_OK) and not p.endswith(".d")]
    return max(cands, key=os.path.getmtime)


def time_rust(binary, name, batch, iters, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([binary, "--workload", name, "--batch", str(batch), "--iters", str(iters)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--workloads", nargs="*")
    ap.add_argument("--out", default="benches/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    binary = rust_binary()
    workloads = args.workloads or subprocess.run([binary, "--list"], capture_output=True, text=True,
                                                 check=True).stdout.split()
    rows = []
    for name in workloads:
        for b in args.batches:
            t_torch = time_torch(name, b, args.iters)
            t_ours = time_rust(binary, name, b, args.iters, args.threads)
            rows.append((name, b, t_torch, t_ours))
            print(f"{name:28s} batch {b:3d}: pytorch {t_torch:8.3f} s  tuwen {t_ours:8.3f} s  ratio {t_ours / t_torch:5.2f}",
                  flush=True)
    import transformers
    lines = [
        "# Benchmarks: tuwen vs PyTorch",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} threads each, fp32, median of {args.iters} runs, "
        f"one run of `benches/compare_pytorch.py` alternating the two.",
        f"PyTorch {torch.__version__}, transformers {transformers.__version__}; tuwen "
        f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}.",
        "",
        "| workload | batch | PyTorch s/batch | tuwen s/batch | ratio (tuwen / PyTorch) |",
        "|---|---|---|---|---|",
    ]
    for name, b, tt, to in rows:
        lines.append(f"| {name} | {b} | {tt:.3f} | {to:.3f} | {to / tt:.2f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
