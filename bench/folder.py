#!/usr/bin/env python3
"""A folder of JPEGs to features on disk: ours against torchvision's ImageFolder, whole jobs.

Run from the repository root after building our side:

    cargo build --release --bin cifar-finetune
    python3 bench/folder.py                    # 1,000 JPEGs of 500x375, 2 threads

What it does:

1. generates (once, cached under --work) a folder of ``--images`` JPEGs of 500x375 in 10
   class folders (seeded smooth colour fields with texture and noise, Pillow quality 90,
   4:2:0), and the synthetic ResNet-50 weights of tools/gen_backbone_fixtures.py as a .pth;
2. times each whole job as a process, from its start to its features on disk, ``--rounds``
   times, alternating the two sides:
   * ours: ``cifar-finetune features --dataset folder --split all`` with a fresh cache
     (decode with libjpeg-turbo, Resize(256) + CenterCrop(224) as Pillow, fast backbone);
   * PyTorch: ``ImageFolder`` + ``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor`` +
     ``Normalize`` + ``DataLoader(batch_size=16, num_workers=2)`` + torchvision's resnet50
     up to the pool, in ``--torch-mode`` (default: fp32 channels_last, PyTorch's best fp32
     mode; ``bf16`` autocast is best on CPUs with AMX), features saved with ``np.save``;
3. prints the median seconds and images/s of each, the ratio, each side's peak memory
   (resident set of the process and of its DataLoader workers), and our share of time
   outside the backbone: 1 - (the backbone's seconds, which ``features`` reports on its last
   line from its own clock) / (our whole job, process start to exit).

Both sides use ``--threads`` threads for the network. The folder is generated with Pillow, so
that both sides decode the same bytes.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

TORCH_JOB = r"""
import sys, time
import numpy as np
import torch, torchvision
from torchvision import transforms
folder, weights, out, threads, mode = sys.argv[1:6]
torch.set_num_threads(int(threads))
model = torchvision.models.resnet50(weights=None)
model.load_state_dict(torch.load(weights))
model.eval()
net = torch.nn.Sequential(*list(model.children())[:-1])
tf = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
data = torchvision.datasets.ImageFolder(folder, transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2)
channels_last = mode in ("channels_last", "bf16")
if channels_last:
    net = net.to(memory_format=torch.channels_last)
feats = []
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
    for x, _ in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(net(x).flatten(1).float().numpy())
np.save(out, np.concatenate(feats))
"""


def make_folder(root, count, seed=0):
    """`count` JPEGs of 500x375 in 10 class folders (skipped when already there)."""
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        cls = os.path.join(root, f"class_{i % 10:02d}")
        os.makedirs(cls, exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.03, 3)
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([
            127 + 100 * np.sin(a * x + b * y + phase[k]) * np.cos(c * (x - y) + k) for k in range(3)
        ], axis=-1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(cls, f"img_{i:05d}.jpg"), quality=90)
    open(done, "w").close()


def write_weights(path):
    import torch
    import torchvision
    from gen_backbone_fixtures import synthetic

    model = torchvision.models.resnet50(weights=None)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v if k.endswith("num_batches_tracked") else torch.from_numpy(synthetic(k, tuple(v.shape)))
    torch.save(sd, path)


def timed(cmd, env=None):
    """(seconds, peak RSS MiB, stdout) of one command run to completion. The peak is the
    largest resident set of the process and of the children it waited for (a DataLoader's
    workers), as Linux reports it through wait4."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{err.decode(errors='replace')}")
    return seconds, proc.peak_rss / 1024, out.decode(errors="replace")


class Popen(subprocess.Popen):
    """subprocess.Popen that keeps the child's rusage from wait4."""

    peak_rss = 0

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid:
            self.peak_rss = usage.ru_maxrss
        return (pid, status)


subprocess.Popen = Popen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="whole jobs per side")
    ap.add_argument("--torch-mode", choices=["nchw", "channels_last", "bf16"], default="channels_last")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-folder"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "cifar-finetune"))
    ap.add_argument("--write-weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_weights:
        write_weights(args.write_weights)
        return
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: cargo build --release --bin cifar-finetune")

    folder = os.path.join(args.work, f"jpegs-{args.images}")
    make_folder(folder, args.images)
    weights = os.path.join(args.work, "resnet50-synthetic.pth")
    if not os.path.exists(weights):
        # In a child: a child's peak resident set as wait4 reports it starts from its
        # parent's at the fork, so importing torch here would add ~900 MiB to every job's.
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-weights", weights], check=True)
    print(f"{args.images} JPEGs of 500x375 in {folder}; load before: {os.getloadavg()}", flush=True)

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    runs = {"ours": [], "torch": []}
    inside = []  # our backbone's seconds within each of our jobs, as the binary reports them
    rss = {}
    for r in range(args.rounds):
        sides = ["ours", "torch"] if r % 2 == 0 else ["torch", "ours"]
        for side in sides:
            if side == "torch" and args.no_torch:
                continue
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                if side == "ours":
                    cmd = [args.binary, "features", "--dataset", "folder", "--folder", folder,
                           "--weights", weights, "--data", tmp, "--cache-dir", os.path.join(tmp, "cache"),
                           "--offline", "--split", "all", "--out", os.path.join(tmp, "f.safetensors")]
                else:
                    cmd = [sys.executable, "-c", TORCH_JOB, folder, weights, os.path.join(tmp, "f.npy"),
                           str(args.threads), args.torch_mode]
                seconds, peak, stdout = timed(cmd, env)
                if side == "ours":
                    m = re.search(r"of which the backbone ([0-9.]+) s", stdout)
                    inside.append(float(m.group(1)) if m else float("nan"))
            runs[side].append(seconds)
            rss[side] = max(rss.get(side, 0), peak)
            print(f"round {r + 1}: {side} {seconds:.1f} s ({args.images / seconds:.2f} images/s), "
                  f"peak {peak:.0f} MiB", flush=True)

    print(f"\nwhole job, {args.images} JPEGs -> features on disk, median of {args.rounds}:")
    med = {s: statistics.median(t) for s, t in runs.items() if t}
    for s, t in med.items():
        print(f"  {s:<6} {t:7.1f} s  {args.images / t:6.2f} images/s  peak {rss[s]:.0f} MiB")
    if "torch" in med:
        print(f"  ours / torch ({args.torch_mode}): {med['torch'] / med['ours']:.2f}x faster")
    backbone = statistics.median(inside)
    print(f"  our backbone within our job: {backbone:.1f} s (its own clock) -> "
          f"{100 * (1 - backbone / med['ours']):.1f} % of our whole job outside the backbone "
          f"(process start, weights, hashing, decoding, resizing, cache writes)")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
