#!/usr/bin/env python3
"""Peak memory of a feature extraction: bounded by the batch, not by the dataset.

Run from the repository root after building our binary:

    cargo build --release --bin cifar-finetune
    python3 bench/memory.py

Runs ``cifar-finetune features`` (224 px, fast f32 path, synthetic weights, a synthetic
CIFAR-10 binary set) for several image counts and batch sizes, each in a fresh process, and
prints each run's peak resident memory (``ru_maxrss`` from ``wait4``) and throughput.
What grows with the image count is only what must: the dataset bytes read (3 KiB per image)
and the features kept for the output (8 KiB per image); the network's buffers grow with
the batch alone.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workflow import write_cifar  # noqa: E402


def run(cmd):
    """Runs `cmd`; returns (seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read()}")
    return seconds, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "cifar-finetune"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", default="16:128,16:1024,4:128,32:128",
                    help="comma-separated batch:images pairs")
    ap.add_argument("--precision", default="f32")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release --bin cifar-finetune` first")
    runs = [tuple(int(v) for v in r.split(":")) for r in args.runs.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        write_cifar(tmp, per_batch=max(n for _, n in runs))
        weights = os.path.join(tmp, "resnet50-synthetic.safetensors")
        # In a child process: a child's ru_maxrss counts the parent it was forked from, so this
        # process must never hold torch and the weights itself.
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "from workflow import synthetic_weights; synthetic_weights(sys.argv[2])",
                        os.path.dirname(os.path.abspath(__file__)), weights], check=True)
        print(f"{'batch':>5} {'images':>7} {'peak RSS MiB':>13} {'images/s':>9}")
        for batch, n in runs:
            cache = os.path.join(tmp, f"cache-{batch}-{n}")
            cmd = [args.binary, "features", "--data", tmp, "--weights", weights, "--offline", "--split", "train",
                   "--limit", str(n), "--val-count", "0", "--batch-size", str(batch), "--image-size",
                   str(args.size), "--precision", args.precision, "--cache-dir", cache,
                   "--out", os.path.join(tmp, "features.safetensors")]
            seconds, rss = run(cmd)
            print(f"{batch:>5} {n:>7} {rss:>13.0f} {n / seconds:>9.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
