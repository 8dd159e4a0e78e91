#!/usr/bin/env python3
"""Head training on cached features: PyTorch's loop against ours, on the same features.

    cargo build --release --example bench_head
    python3 bench/head/bench.py [--runs 3] [--features /tmp/bench_head_features.safetensors] [--no-sweep]

1. Writes (once) 50,000 random 2048-d features with labels in the feature cache's format
   (safetensors: `features` f32 [N, 2048], `labels` u8 [N], `index` i64 [N], metadata
   `extractor`), class-dependent so that training is not a no-op.
2. Times one epoch of head training (Linear → ReLU → Linear, our default head; the course
   script's has no ReLU, which changes nothing in the cost) on the first 45,000 rows, batch 4,
   SGD(lr=0.001, momentum=0.9), CrossEntropyLoss — PyTorch with a DataLoader over a
   TensorDataset (the original loop, `running_loss += loss.item()` included) and with plain
   tensor indexing (PyTorch without the DataLoader's per-batch overhead).
3. Runs `target/release/examples/bench_head` on the same file: one epoch of our training loop
   (median of --runs) and the default sweep (5 λ × 10 epochs, validation every epoch).
4. Prints the medians and the ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.numpy import save_file

N, DIM, TRAIN = 50_000, 2048, 45_000
ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def make_features(path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N).astype(np.uint8)
    x = np.abs(rng.standard_normal((N, DIM), dtype=np.float32)) * 0.5
    for c in range(10):
        x[labels == c, c * 200 : (c + 1) * 200] += 0.5
    save_file(
        {"features": x, "labels": labels, "index": np.arange(N, dtype=np.int64)},
        path,
        # The text form of features::Fingerprint, which the reader parses.
        metadata={"extractor": "bench-random-avgpool; weights sha256:00; random; precision f32"},
    )


def head():
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def epoch_dataloader(x, y):
    net = head()
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True
    )
    start = time.perf_counter()
    running = 0.0
    for inputs, labels in loader:
        opt.zero_grad()
        loss = crit(net(inputs), labels)
        loss.backward()
        opt.step()
        running += loss.item()
    return time.perf_counter() - start


def epoch_indexing(x, y):
    net = head()
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    perm = torch.randperm(x.shape[0])
    running = 0.0
    for s in range(0, x.shape[0], 4):
        idx = perm[s : s + 4]
        opt.zero_grad()
        loss = crit(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        running += loss.item()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default="/tmp/bench_head_features.safetensors")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="PyTorch intra-op threads (1: its fastest for these tiny ops, and ours is 1 thread; "
        "0: PyTorch's default)",
    )
    args = ap.parse_args()

    exe = os.path.join(ROOT, "target", "release", "examples", "bench_head")
    if not os.path.exists(exe):
        sys.exit(f"{exe} is missing: run `cargo build --release --example bench_head` first")
    if not os.path.exists(args.features):
        print(f"writing {args.features} ...", flush=True)
        make_features(args.features)

    from safetensors.numpy import load_file

    data = load_file(args.features)
    x = torch.from_numpy(data["features"][:TRAIN].copy())
    y = torch.from_numpy(data["labels"][:TRAIN].astype(np.int64))
    torch.manual_seed(0)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()
    timings = {}
    for name, fn in (("dataloader", epoch_dataloader), ("indexing", epoch_indexing)):
        timings[name] = [fn(x, y) for _ in range(args.runs)]
        print(f"PyTorch {name}: {['%.2f' % t for t in timings[name]]} s", flush=True)

    cmd = [exe, "--features", args.features, "--runs", str(max(args.runs, 5))]
    if not args.no_sweep:
        cmd.append("--sweep")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    ours = json.loads(out.stdout.strip().splitlines()[-1])

    med = {k: float(np.median(v)) for k, v in timings.items()}
    o = ours["epoch_median"]
    print()
    print(f"one epoch, 45,000 cached features, batch 4 (PyTorch {torch.__version__}, {threads} threads)")
    print(f"  PyTorch, DataLoader (the original loop)   median {med['dataloader']:7.3f} s")
    print(f"  PyTorch, tensor indexing                  median {med['indexing']:7.3f} s")
    print(f"  ours (fused f32 kernels, 1 thread)        median {o:7.3f} s  ({o / 11250 * 1e6:.1f} µs/step)")
    print(f"  ratio PyTorch DataLoader / ours: {med['dataloader'] / o:6.1f}×   (target ≥ 10×)")
    print(f"  ratio PyTorch indexing / ours:   {med['indexing'] / o:6.1f}×")
    if ours.get("sweep_seconds") is not None:
        print(f"default sweep, 5 λ × 10 epochs, validation every epoch: {ours['sweep_seconds']:.1f} s (target < 30 s)")


if __name__ == "__main__":
    main()
