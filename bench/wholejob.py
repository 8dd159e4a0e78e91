#!/usr/bin/env python3
"""The whole feature-extraction job -- CIFAR-10's test images to features on disk, each job a
process timed from its start to its exit -- ours against PyTorch, in one run.

Run from the repository root after building our binary:

    cargo build --release --bin cifar-finetune
    python3 bench/wholejob.py                       # 10,000 test images, 4 contenders, 1 round
    python3 bench/wholejob.py --images 320          # a quick check (~4 min)
    python3 bench/wholejob.py --only ours-f32,torch-fp32-cl --rounds 3 --json wholejob.json

At the default 10,000 images one job takes 7-10 min (ours f32, PyTorch fp32 channels_last) to
25-45 min (PyTorch's bf16 autocast, emulated on CPUs without AVX512-BF16/AMX) on 2 Ice Lake
cores, so ``--rounds`` defaults to 1; ``--only`` picks contenders.

What it does:

1. writes (once per ``--images``, cached under ``--work``) a synthetic CIFAR-10 in both real
   distributions, the same images in each:
   * ``cifar-10-batches-bin/``: data_batch_1..5.bin and test_batch.bin of ``--images``
     3,073-byte records each (a full-size set at the default), batches.meta.txt -- written by
     bench/workflow.py's ``write_cifar`` (class colour + noise);
   * ``cifar-10-batches-py/``: test_batch (those test records as a pickled dict, byte-for-byte
     the real files' Python 2 cPickle layout, tools/gen_data_fixtures.py's ``py2_pickle``) and
     batches.meta, which is all torchvision's ``CIFAR10(train=False)`` reads;
   and the synthetic ResNet-50 weights of tools/gen_backbone_fixtures.py as a .safetensors
   (bench/workflow.py's ``synthetic_weights``), which both sides load;
2. times ``--rounds`` whole jobs of each contender, the order rotating every round so the load
   of other processes hits all alike; each job gets a fresh output (and cache) directory:
   * ``ours-f32`` / ``ours-bf16``: ``cifar-finetune features --split test --precision f32|bf16``
     (Resize(224), ImageNet normalisation, batch 16: the defaults) into an empty cache;
   * ``torch-fp32-cl`` / ``torch-bf16-cl``: a fresh ``python3 -c`` doing what a PyTorch user
     writes: ``torchvision.datasets.CIFAR10(root, train=False)`` with Resize(224) + ToTensor +
     Normalize(ImageNet), ``DataLoader(batch_size=16, num_workers=2)``, ``resnet50`` with the
     same weights and ``fc = Identity``, ``eval()``, ``torch.inference_mode()``, in
     bench/backbone.py's two best CPU modes: fp32 channels_last, and bf16 autocast
     channels_last; the [N, 2048] features saved with ``np.save``;
3. prints each contender's median seconds and images/s, the ratio of our best contender to
   PyTorch's best (overall and round by round: a round's jobs ran close together, under
   similar load) and of every pair, each job's peak memory, and the network's share: ours from
   the ``time:`` line ``features`` prints (its own clock: loading the network + forward passes),
   PyTorch's from the same two things timed inside its job -- which gives a forward-pass ratio
   for free (measured within loaded whole jobs; bench/backbone.py measures warm passes
   interleaved, the cleaner figure);
4. checks the features agree: ours f32 against PyTorch fp32 (max relative error), the bf16
   ones by their smallest cosine to PyTorch fp32.

Peak memory is each job's resident high-water mark as wait4 reports it (the process and the
DataLoader workers it waited for). It starts from this script's own size at the fork (~30 MiB:
Python and numpy), so the data and weights are made by a child process (``--prepare``) that
alone imports torch, and the features are compared from files once every job is timed.

Threads: PyTorch gets ``torch.set_num_threads(--threads)``; ours uses every core the process
may run on (``available_parallelism``), so keep ``--threads`` at the machine's core count (2
here) -- the script warns otherwise. torchvision's md5 check of the six real files is skipped
(the files are synthetic; on the real 178 MB it costs a PyTorch user a fraction of a second).
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

CONTENDERS = ["ours-f32", "ours-bf16", "torch-fp32-cl", "torch-bf16-cl"]

# The PyTorch job, run as `python3 -c TORCH_JOB root weights out threads mode`. It prints one
# JSON line with its own clocks: the network's load and its forward passes.
TORCH_JOB = r"""
import json, sys, time
import numpy as np
import torch, torchvision
from safetensors.torch import load_file
from torchvision import transforms
root, weights, out, threads, mode = sys.argv[1:6]
torch.set_num_threads(int(threads))


class CIFAR10(torchvision.datasets.CIFAR10):
    # The synthetic files cannot match the real md5s: skip the checks (the real files' and
    # their meta file's).
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    def _check_integrity(self):
        return True


tf = transforms.Compose([
    transforms.Resize(224), transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
data = CIFAR10(root, train=False, transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2)
t = time.perf_counter()
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(load_file(weights))
model.fc = torch.nn.Identity()
model.eval()
model = model.to(memory_format=torch.channels_last)
load = time.perf_counter() - t
forward = 0.0
feats = []
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
    for x, _ in loader:
        x = x.contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        y = model(x)  # [batch, 2048]
        forward += time.perf_counter() - t
        feats.append(y.float().numpy())
np.save(out, np.concatenate(feats))  # [N, 2048] float32
print(json.dumps({"load": load, "forward": forward, "torch": torch.__version__,
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def prepare(data, weights, count):
    """The data (see write_data) and the synthetic weights, when not already there. Run in a
    child process (`--prepare`): it imports torch."""
    from workflow import synthetic_weights

    os.makedirs(os.path.dirname(data), exist_ok=True)
    write_data(data, count)
    if not os.path.exists(weights):
        synthetic_weights(weights + ".tmp")
        os.replace(weights + ".tmp", weights)


def write_data(root, count):
    """A synthetic CIFAR-10 under `root` in both distributions (skipped when already there):
    the binary one with `count` records per batch file, and the python one's test batch."""
    import gen_data_fixtures
    from workflow import read_records, write_cifar

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    bindir = write_cifar(root, per_batch=count)
    images, labels = read_records(os.path.join(bindir, "test_batch.bin"), count)  # [N, 3, 32, 32]
    py = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(py)
    names = [f"synthetic_{i:05d}.png".encode() for i in range(count)]
    batch = gen_data_fixtures.batch_dict(b"testing batch 1 of 1",
                                         np.ascontiguousarray(images.reshape(count, 3072)),
                                         labels.tolist(), names)
    with open(os.path.join(py, "test_batch"), "wb") as f:
        f.write(gen_data_fixtures.py2_pickle(batch))
    with open(os.path.join(py, "batches.meta"), "wb") as f:
        f.write(gen_data_fixtures.py2_pickle({
            b"num_cases_per_batch": 10000,
            b"label_names": [c.encode() for c in gen_data_fixtures.CLASSES],
            b"num_vis": 3072,
        }))
    open(done, "w").close()


def job(name, args, data, weights, out_dir):
    """The command line of contender `name`, writing its features under `out_dir`, and the
    file it writes."""
    if name.startswith("ours"):
        out = os.path.join(out_dir, "features.safetensors")
        return [args.binary, "features", "--dataset", "cifar10", "--data", data, "--split", "test",
                "--weights", weights, "--offline", "--precision", name.split("-")[1],
                "--cache-dir", os.path.join(out_dir, "cache"), "--out", out], out
    out = os.path.join(out_dir, "features.npy")
    mode = "bf16" if name == "torch-bf16-cl" else "fp32"
    return [sys.executable, "-c", TORCH_JOB, data, weights, out, str(args.threads), mode], out


def read_features(path):
    """[N, 2048] float32 of either side's output file."""
    if path.endswith(".npy"):
        return np.load(path)
    from safetensors.numpy import load_file

    st = load_file(path)
    order = np.argsort(st["index"])  # dataset order, as the DataLoader's
    return st["features"][order]


def cpu_model():
    """The CPU's model name as /proc/cpuinfo (and lscpu) give it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def network_seconds(name, stdout):
    """The job's own clock of its network: loading it plus its forward passes."""
    if name.startswith("ours"):
        m = re.search(r"of which the backbone ([0-9.]+) s", stdout)
        return float(m.group(1)) if m else float("nan")
    clocks = json.loads(stdout.strip().splitlines()[-1])
    return clocks["load"] + clocks["forward"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000, help="test images (the whole test set: 10,000)")
    ap.add_argument("--rounds", type=int, default=1, help="whole jobs per contender (7-45 min each at "
                    "10,000 images on 2 cores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders, of: "
                    + ", ".join(CONTENDERS))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-wholejob"),
                    help="where the data and weights are kept between runs")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "cifar-finetune"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = os.path.join(args.work, f"cifar-{args.images}")
    weights = os.path.join(args.work, "resnet50-synthetic.safetensors")
    if args.prepare:
        prepare(data, weights, args.images)
        return
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        sys.exit(f"unknown contenders {sorted(unknown)}; expected some of {CONTENDERS}")
    if any(n.startswith("ours") for n in names) and not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: cargo build --release --bin cifar-finetune")
    if args.threads != os.cpu_count():
        print(f"warning: ours uses all {os.cpu_count()} cores, PyTorch --threads {args.threads}")

    # The data and weights are made by a child process: this one must stay small, because a
    # child's peak resident set as wait4 reports it starts from its parent's at the fork (the
    # kernel keeps the old image's high-water mark across exec). Importing torch here would
    # put ~900 MiB under every job's peak; what stays here is Python and numpy, ~30 MiB.
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--images", str(args.images),
                    "--work", args.work], check=True)
    # The wait4-based timer of bench/folder.py (importing it installs its Popen, which keeps
    # each child's peak resident set, DataLoader workers included).
    from folder import timed

    load_before = os.getloadavg()
    print(f"{args.images} CIFAR-10 test images in {data}; {args.threads} threads; "
          f"load average before: {load_before}", flush=True)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    seconds = {n: [] for n in names}
    network = {n: [] for n in names}
    peak = {n: 0.0 for n in names}
    kept = os.path.join(args.work, "features")  # the first round's output of each contender,
    shutil.rmtree(kept, ignore_errors=True)      # compared once all jobs are timed
    os.makedirs(kept)
    feats = {}
    info = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            out_dir = tempfile.mkdtemp(prefix=f"{n}-", dir=args.work)
            try:
                cmd, out = job(n, args, data, weights, out_dir)
                s, rss, stdout = timed(cmd, env)
                if n not in feats:
                    feats[n] = os.path.join(kept, n + os.path.splitext(out)[1])
                    os.replace(out, feats[n])
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
            seconds[n].append(s)
            network[n].append(network_seconds(n, stdout))
            peak[n] = max(peak[n], rss)
            if n.startswith("torch"):
                clocks = json.loads(stdout.strip().splitlines()[-1])
                info = {"version": clocks["torch"], "capability": clocks["capability"]}
            print(f"round {r + 1}/{args.rounds}: {n:<14} {s:8.1f} s  {args.images / s:6.2f} images/s  "
                  f"network {network[n][-1]:.1f} s  peak {rss:.0f} MiB  (load {os.getloadavg()[0]:.2f})",
                  flush=True)
    load_after = os.getloadavg()

    med = {n: statistics.median(seconds[n]) for n in names}
    net = {n: statistics.median(network[n]) for n in names}
    print(f"\nwhole job: {args.images} CIFAR-10 test images -> features on disk, process start to exit, "
          f"median of {args.rounds} (min-max):")
    for n in names:
        print(f"  {n:<14} {med[n]:8.1f} s ({min(seconds[n]):.1f}-{max(seconds[n]):.1f})  "
              f"{args.images / med[n]:6.2f} images/s  network {net[n]:.1f} s "
              f"({100 * net[n] / med[n]:.1f} % of the job)  peak {peak[n]:.0f} MiB")
    ratios = {}
    ours = [n for n in names if n.startswith("ours")]
    torch_ = [n for n in names if n.startswith("torch")]
    if ours and torch_:
        best_o = min(ours, key=med.get)
        best_t = min(torch_, key=med.get)
        print(f"\nours best ({best_o}) / PyTorch best ({best_t}): whole job {med[best_t] / med[best_o]:.2f}x "
              f"faster; network alone (load + forward, each job's own clock) "
              f"{net[best_t] / net[best_o]:.2f}x")
        for o in ours:
            for t in torch_:
                ratios[f"{o} / {t}"] = {"whole_job": med[t] / med[o], "network": net[t] / net[o]}
                print(f"  {o:<10} / {t:<14} whole job {med[t] / med[o]:5.2f}x  network {net[t] / net[o]:5.2f}x")
        per_round = [t / o for o, t in zip(seconds[best_o], seconds[best_t])]
        print(f"  {best_o} / {best_t} round by round: " + ", ".join(f"{x:.2f}x" for x in per_round))
        ratios["best"] = {"ours": best_o, "torch": best_t, "whole_job": med[best_t] / med[best_o],
                          "network": net[best_t] / net[best_o], "whole_job_per_round": per_round}

    checks = {}
    if "torch-fp32-cl" in feats:
        ref = read_features(feats["torch-fp32-cl"])
        scale = float(np.abs(ref).max())
        for n, path in feats.items():
            if n == "torch-fp32-cl":
                continue
            f = read_features(path)
            err = float(np.abs(f - ref).max() / scale)
            cos = float(np.min(np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))))
            checks[n] = {"max_rel_err": err, "min_cosine": cos}
            print(f"features {n} against torch-fp32-cl: max relative error {err:.2e}, min cosine {cos:.6f}")
    print(f"load average before {load_before}, after {load_after}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "images": args.images, "rounds": args.rounds, "threads": args.threads,
                "cpu": cpu_model(), "torch": info,
                "load_before": load_before, "load_after": load_after,
                "seconds": seconds, "median_seconds": med,
                "images_per_second": {n: args.images / med[n] for n in names},
                "network_seconds": network, "peak_rss_mib": peak, "ratios": ratios, "features": checks,
            }, f, indent=2)


if __name__ == "__main__":
    main()
