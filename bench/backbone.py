#!/usr/bin/env python3
"""Backbone throughput (ResNet-50 by default): ours against PyTorch, on the same images, in
one session.

Run from the repository root after building our side:

    cargo build --release --example bench_backbone
    python3 bench/backbone.py                      # resnet50, batch 16, 224 px, 2 threads, 5 rounds
    python3 bench/backbone.py --backbone resnet18  # any torchvision ResNet: resnet18, resnet34,
                                                   # resnet50, resnet101, resnet152,
                                                   # wide_resnet50_2, wide_resnet101_2

What it does:

1. writes a random batch ``[batch, 3, size, size]`` (float32, seeded) to a temporary file;
2. starts our benchmark binary (``target/release/examples/bench_backbone --serve``) once per
   contender -- fast f32, fast bf16, and with ``--candle`` the candle reference -- all on that
   file, each holding its network and buffers warm;
3. builds torchvision's ``--backbone`` with the same synthetic weights
   (``tools/gen_backbone_fixtures.py``), up to the average pool, in three modes: fp32 NCHW
   (what the original script does), fp32 channels_last, bf16 autocast channels_last;
4. times one forward pass of each contender per round, rotating the order every round, so that
   the load other processes put on the machine hits everyone alike; prints the median (and the
   spread) of images/s, and our ratio to each PyTorch mode;
5. checks our features against PyTorch's fp32 ones (max relative error, and the cosine of
   the bf16 features), and prints our per-layer-kind profile and both sides' peak memory.

Timings are wall-clock of the forward pass alone (ours measured inside our process, so the
pipe to it is not counted); both sides use ``--threads`` threads.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))


ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]


def torch_backbone(arch):
    """torchvision's `arch` with the synthetic weights, up to the global average pool."""
    from gen_backbone_fixtures import synthetic_backbone

    return synthetic_backbone(arch)


class Ours:
    """One of our benchmark servers: a warm network answering `run` / `profile N`."""

    def __init__(self, name, binary, images, args, extra):
        self.name = name
        self.features = images + "." + name.replace(" ", "_") + ".features"
        cmd = [
            binary, "--serve", "--images", images, "--batch", str(args.batch), "--size", str(args.size),
            "--threads", str(args.threads), "--features-out", self.features,
        ] + extra
        if args.backbone != "resnet50":
            # Only then: a --baseline built before --backbone existed still runs resnet50.
            cmd += ["--backbone", args.backbone]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        self.peak_rss_mib = None

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: benchmark binary exited (rc {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self):
        return self.ask("run")["seconds"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.peak_rss_mib = self._read().get("peak_rss_mib")
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50", choices=ARCHS, help="the torchvision ResNet to time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed passes per contender")
    ap.add_argument("--candle", action="store_true", help="also time the candle reference path (slow)")
    ap.add_argument("--no-torch", action="store_true", help="time ours only")
    ap.add_argument("--shapes", action="store_true", help="also print our profile per convolution shape")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "examples", "bench_backbone"))
    ap.add_argument("--baseline", help="another build of bench_backbone (e.g. from before a change), "
                    "timed interleaved with ours as 'baseline f32' / 'baseline bf16'")
    ap.add_argument("--slices", help="slice budgets in MiB, comma-separated (inf: no slicing), to time ours "
                    "bf16 with beside the default 8 MiB ('ours bf16 slices N MiB'; tunes SLICE_BYTES)")
    ap.add_argument("--bf16-blockings", help="bf16 blockings to time ours bf16 with beside the default, "
                    "separated by ';' (each bench_backbone's --bf16-blocking: 'a=256K,rows=128;stream=inf'; "
                    "'ours bf16 blocking SPEC'; tunes Bf16Blocking's defaults)")
    ap.add_argument("--algorithms", help="3x3 algorithms to time ours f32 with beside the default, "
                    "comma-separated (each bench_backbone's --algorithm: direct, winograd2; "
                    "'ours f32 ALGORITHM'), to check that Winograd and its tilings pay on this CPU")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release --example bench_backbone` first")
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench-backbone-")
    images = os.path.join(tmp, "images.f32")
    x_np = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    x_np.astype("<f4").tofile(images)

    contenders = {}  # name -> callable returning the seconds of one pass
    ours = [Ours("ours f32", args.binary, images, args, ["--precision", "f32"]),
            Ours("ours bf16", args.binary, images, args, ["--precision", "bf16"])]
    if args.baseline:
        ours += [Ours("baseline f32", args.baseline, images, args, ["--precision", "f32"]),
                 Ours("baseline bf16", args.baseline, images, args, ["--precision", "bf16"])]
    for mib in args.slices.split(",") if args.slices else []:
        ours.append(Ours(f"ours bf16 slices {mib} MiB", args.binary, images, args,
                         ["--precision", "bf16", "--slice-mib", mib]))
    for algorithm in args.algorithms.split(",") if args.algorithms else []:
        ours.append(Ours(f"ours f32 {algorithm}", args.binary, images, args,
                         ["--precision", "f32", "--algorithm", algorithm]))
    for spec in args.bf16_blockings.split(";") if args.bf16_blockings else []:
        ours.append(Ours(f"ours bf16 blocking {spec}", args.binary, images, args,
                         ["--precision", "bf16", "--bf16-blocking", spec]))
    if args.candle:
        ours.append(Ours("ours candle f32", args.binary, images, args, ["--implementation", "candle"]))
    for o in ours:
        contenders[o.name] = o.run
        print(f"{o.name}: {o.ready['implementation']}", flush=True)

    torch_features = None
    have_torch = False
    if not args.no_torch:
        try:
            import torch

            have_torch = True
        except ImportError:
            print("torch is not installed: timing ours only")
    if have_torch:
        torch.set_num_threads(args.threads)
        net = torch_backbone(args.backbone)
        x = torch.from_numpy(x_np)
        with torch.inference_mode():
            torch_features = net(x).flatten(1).numpy()
        net_cl = net.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def torch_pass(model, inp, bf16):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    t = time.perf_counter()
                    model(inp)
                    return time.perf_counter() - t

            run()  # warm-up: oneDNN picks and caches its kernels on the first pass
            return run

        # channels_last converts the module in place: rebuild the NCHW one.
        net_nchw = torch_backbone(args.backbone)
        contenders["torch fp32 NCHW"] = torch_pass(net_nchw, x, False)
        contenders["torch fp32 channels_last"] = torch_pass(net_cl, x_cl, False)
        contenders["torch bf16 autocast channels_last"] = torch_pass(net_cl, x_cl, True)
        print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"{torch.get_num_threads()} threads", flush=True)

    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(contenders[n]())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {args.batch / times[n][-1]:.2f}" for n in names),
              flush=True)

    ips = {n: args.batch / statistics.median(times[n]) for n in names}
    print(f"\n{args.backbone} images/s, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds (min-max):")
    for n in names:
        lo, hi = args.batch / max(times[n]), args.batch / min(times[n])
        print(f"  {n:<36} {ips[n]:7.2f}  ({lo:.2f}-{hi:.2f})")
    best = {n: args.batch / min(times[n]) for n in names}
    ratios = {}
    torch_names = [n for n in names if n.startswith("torch")]
    if torch_names:
        print("\nours / torch: ratio of the medians, and of the best passes (least disturbed by "
              "other processes):")
        for o in [n for n in names if n.startswith(("ours", "baseline"))]:
            for t in torch_names:
                ratios[f"{o} / {t}"] = {"median": ips[o] / ips[t], "best": best[o] / best[t]}
                print(f"  {o:<16} / {t:<36} {ips[o] / ips[t]:5.2f}x  (best {best[o] / best[t]:5.2f}x)")

    checks = {}
    if torch_features is not None:
        ref = torch_features.reshape(args.batch, -1)
        scale = np.abs(ref).max()
        for o in ours:
            f = np.fromfile(o.features, dtype="<f4").reshape(args.batch, -1)
            err = float(np.abs(f - ref).max() / scale)
            cos = float(min(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(f, ref)))
            checks[o.name] = {"max_rel_err": err, "min_cosine": cos}
        if args.baseline:
            for p in ("f32", "bf16"):
                same = np.array_equal(np.fromfile(ours[0 if p == "f32" else 1].features, dtype="<f4"),
                                      np.fromfile(ours[2 if p == "f32" else 3].features, dtype="<f4"))
                print(f"ours {p} features {'bit-identical to' if same else 'DIFFER from'} the baseline's")
        print("\nfeatures against torch fp32 NCHW: " + "; ".join(
            f"{n}: max rel err {c['max_rel_err']:.2e}, min cosine {c['min_cosine']:.6f}" for n, c in checks.items()))

    profiles = {}
    for o in ours[:2]:
        p = o.ask("profile 2")
        profiles[o.name] = p
        total = p["total_seconds_per_pass"]
        print(f"\nprofile of {o.name} ({o.ready['implementation']}), per pass of {args.batch} images:")
        print(f"  {'layer kind':<18} {'seconds':>8} {'share':>7} {'GFLOP':>7} {'GFLOP/s':>8}")
        for k in p["kinds"]:
            print(f"  {k['kind']:<18} {k['seconds_per_pass']:8.4f} {100 * k['seconds_per_pass'] / total:6.1f}% "
                  f"{k['gflop_per_pass']:7.2f} {k['gflops']:8.1f}")
        print(f"  {'total':<18} {total:8.4f}; packing activations (im2col gathers included): "
              f"{p['pack_thread_seconds_per_pass']:.4f} thread-seconds, inside the convolutions")
        if args.shapes and "shapes" in p:
            print(f"  {'convolution shape':<46} {'layers':>6} {'seconds':>8} {'share':>7} {'GFLOP/s':>8}")
            for s in sorted(p["shapes"], key=lambda s: -s["seconds_per_pass"]):
                print(f"  {s['shape']:<46} {s['layers']:6.0f} {s['seconds_per_pass']:8.4f} "
                      f"{100 * s['seconds_per_pass'] / total:6.1f}% {s['gflops']:8.1f}")

    for o in ours:
        o.close()
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\npeak resident memory: " + ", ".join(f"{o.name} {o.peak_rss_mib:.0f} MiB" for o in ours)
          + (f", this python process (torch, all modes) {torch_rss:.0f} MiB" if have_torch else ""))
    load_after = os.getloadavg()
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs: other processes share the machine, compare ratios, not absolutes")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "images_per_second": ips, "best_images_per_second": best, "seconds": times, "ratios": ratios,
                       "checks": checks, "profiles": profiles,
                       "peak_rss_mib": {o.name: o.peak_rss_mib for o in ours},
                       "load_average": [load_before, load_after]}, f, indent=2)
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
