#!/usr/bin/env python3
"""The whole original workflow timed both ways on the same small subset.

Run from the repository root after building our binary:

    cargo build --release --bin cifar-finetune
    python3 bench/workflow.py                       # 500 train + 100 val, 10 epochs, 5 lambdas

The workload (the course script's, with our default head): a frozen ResNet-50 with a
2048->32->ReLU->10 head (the script's own head is 2048->32->Dropout(0.5)->10 with no activation,
`--preset original`; the difference costs nothing measurable next to the backbone), SGD (lr 0.001,
momentum 0.9, batch 4), 10 epochs per L2 strength, validation every epoch, 5 strengths (0, 1e-4,
1e-3, 1e-2, 1e-1), images Resize(224) -> ToTensor -> Normalize(0.5).

* PyTorch, as the original script does it: every mini-batch of 4 goes through the whole
  network (fp32, NCHW), so the frozen backbone re-runs on every image in every epoch of every
  lambda. Only ``--torch-epochs`` epochs (default 1) of the first lambda are run and timed; the
  total is that per-epoch time times epochs x lambdas (every epoch does the same work).
* Ours: ``cifar-finetune sweep`` end to end, measured whole: it extracts the 600 features
  once into the cache (fast backbone), then trains the 5 heads on the cached features. A second
  identical run (the cache now full) gives the training part alone.

The data is a synthetic CIFAR-10 binary set (colour-coded classes, so both sides learn
something: validation accuracy is printed as a sanity check), and the weights are the
synthetic ones of tools/gen_backbone_fixtures.py unless ``--weights`` names a real file.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

LAMBDAS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


def write_cifar(root, per_batch, seed=0):
    """A CIFAR-10 binary set: 5 training batches and a test batch of `per_batch` records each;
    class c's images are a class colour plus noise."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(10, 3))
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
        noise = rng.integers(-40, 41, size=(per_batch, 3, 32, 32))
        imgs = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        rec = np.concatenate([labels[:, None], imgs.reshape(per_batch, -1)], axis=1)
        rec.astype(np.uint8).tofile(os.path.join(d, name))
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                           "truck"]) + "\n")
    return d


def read_records(path, n):
    rec = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)[:n]
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def synthetic_weights(path):
    import torch
    import torchvision
    from gen_backbone_fixtures import synthetic
    from safetensors.torch import save_file

    sd = torchvision.models.resnet50(weights=None).state_dict()
    out = {k: (v if k.endswith("num_batches_tracked") else torch.from_numpy(synthetic(k, tuple(v.shape))))
           for k, v in sd.items()}
    save_file(out, path)


def torch_workflow(weights, images, labels, n_train, args):
    """The original script's loop for `args.torch_epochs` epochs of the first lambda; returns
    the seconds of each epoch (training + validation) and the last validation accuracy."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    else:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    for p in model.parameters():
        p.requires_grad = False
    model.fc = torch.nn.Sequential(torch.nn.Linear(2048, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model.eval()  # frozen backbone: batch norm uses its running statistics
    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    pil = [Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), "RGB") for im in images]
    lam = LAMBDAS[0]
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    epochs, acc = [], float("nan")
    for epoch in range(args.torch_epochs):
        start = time.perf_counter()
        order = torch.randperm(n_train, generator=gen).tolist()
        for b in range(0, n_train, 4):
            idx = order[b:b + 4]
            x = torch.stack([tf(pil[i]) for i in idx])
            y = torch.from_numpy(labels[idx])
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss = loss + lam / 2 * sum((m.weight ** 2).sum() for m in model.fc if isinstance(m, torch.nn.Linear))
            loss.backward()
            opt.step()
        correct = 0
        with torch.no_grad():
            for b in range(n_train, len(pil), 4):
                x = torch.stack([tf(pil[i]) for i in range(b, min(b + 4, len(pil)))])
                correct += int((model(x).argmax(1) == torch.from_numpy(labels[b:b + 4])).sum())
        acc = correct / (len(pil) - n_train)
        epochs.append(time.perf_counter() - start)
        print(f"  torch epoch {epoch + 1}: {epochs[-1]:.1f} s, validation accuracy {acc:.3f}", flush=True)
    return epochs, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-epochs", type=int, default=1, help="epochs PyTorch actually runs (then extrapolated)")
    ap.add_argument("--precision", default="f32", help="ours: f32 or bf16")
    ap.add_argument("--weights", help="a real torchvision ResNet-50 file [default: synthetic weights]")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "cifar-finetune"))
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release --bin cifar-finetune` first")

    tmp = tempfile.mkdtemp(prefix="bench-workflow-")
    try:
        n = args.train + args.val
        bindir = write_cifar(tmp, per_batch=n)
        weights = args.weights or os.path.join(tmp, "resnet50-synthetic.safetensors")
        if not args.weights:
            synthetic_weights(weights)
        lambdas = ",".join(str(x) for x in LAMBDAS)
        common = [args.binary, "sweep", "--data", tmp, "--weights", weights, "--offline", "--limit", str(n),
                  "--val-count", str(args.val), "--epochs", str(args.epochs), "--lambdas", lambdas,
                  "--normalize", "half", "--precision", args.precision, "--cache-dir", os.path.join(tmp, "cache")]
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        timings = []
        for attempt in ("cold cache (extraction + training)", "warm cache (training only)"):
            run_dir = os.path.join(tmp, f"run-{len(timings)}")
            start = time.perf_counter()
            out = subprocess.run(common + ["--run-dir", run_dir], env=env, capture_output=True, text=True)
            timings.append(time.perf_counter() - start)
            if out.returncode != 0:
                sys.exit(f"ours failed ({attempt}):\n{out.stdout}\n{out.stderr}")
            print(f"ours, {attempt}: {timings[-1]:.1f} s", flush=True)
        tail = [line for line in out.stdout.splitlines() if line.strip()][-6:]
        print("  " + "\n  ".join(tail))
        ours_total = timings[0]

        if not args.no_torch:
            images, labels = read_records(os.path.join(bindir, "data_batch_1.bin"), n)
            print(f"torch, {args.torch_epochs} epoch(s) of the first lambda (the backbone re-run on all {n} "
                  "images each epoch):", flush=True)
            epochs, _ = torch_workflow(weights, images, labels, args.train, args)
            per_epoch = float(np.mean(epochs))
            torch_total = per_epoch * args.epochs * len(LAMBDAS)
            print(f"\nwhole workflow ({args.train} train + {args.val} val images, {args.epochs} epochs, "
                  f"validation every epoch, {len(LAMBDAS)} lambdas, {args.threads} threads):")
            print(f"  torch, backbone every epoch: {torch_total:8.0f} s  (measured {per_epoch:.1f} s per epoch "
                  f"x {args.epochs * len(LAMBDAS)} epochs)")
            print(f"  ours, features cached once:  {ours_total:8.1f} s  (of which training the 5 heads "
                  f"{timings[1]:.1f} s)")
            print(f"  ratio: {torch_total / ours_total:.0f}x faster")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
