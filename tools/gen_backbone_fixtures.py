#!/usr/bin/env python3
"""Golden fixtures for the ResNet-50 backbone (tests/backbone.rs), made with PyTorch.

Run by hand from the repository root (needs torch, torchvision, safetensors, Pillow):

    python3 tools/gen_backbone_fixtures.py

It writes, under tests/fixtures/backbone/:

* images.u8         -- 3 CIFAR-sized images, [3, 3, 32, 32] uint8 (R, G, B planes), made from a
                       formula so that pixel (0,1) != pixel (1,0) and the channels differ.
* features_224.f32  -- torchvision's resnet50 (up to the global average pool, eval mode) on
                       those images after its real preprocessing: Resize(224) -> ToTensor ->
                       Normalize(ImageNet mean/std); [3, 2048] little-endian float32.
* features_64_half.f32 -- the same with Resize(64) and mean = std = 0.5; [3, 2048].
* features_resnet18_64_half.f32 -- torchvision's resnet18 (basic blocks) with the same kind of
                       synthetic weights, on the Resize(64), mean = std = 0.5 images; [3, 512].
* arch_<name>_32x40.f32 -- for every ResNet torchvision ships (resnet18/34/50/101/152,
                       wide_resnet50_2/101_2), with the synthetic weights, on the two 32x40
                       inputs of `arch_inputs()` (already normalised, fed to the network as
                       they are); [2, feature_dim]. The largest network is 500 MB of weights:
                       only these few KB of features are committed, and the test rebuilds the
                       weights in memory.
* tiny_f16.pth      -- tiny.pth's float tensors stored as float16 (HalfStorage), as in
                       torchvision's IMAGENET1K_V1 wide_resnet*_2 files.
* resnet101_shapes.pth -- every float tensor name and shape of torchvision's resnet101, all
                       zero-stride views of one shared 1-element storage: what reading a real
                       file's pickle shows of it (the architecture is inferred from names and
                       shapes alone) in 50 KB instead of 170 MB. Its data cannot be loaded.
* tiny.pth          -- a few tensors under real torchvision names, written by torch.save
                       (zip format), an int64 `num_batches_tracked` among them.
* tiny.safetensors  -- the same tensors as safetensors (without num_batches_tracked).

The network's weights are not stored: every element is a hash of (tensor name, element index),
which src/backbone/weights.rs (`synthetic_state_dict`) reproduces bit for bit. Batch-norm
running statistics are non-trivial, so folding them is exercised.
"""

import hashlib
import os

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "backbone")
M64 = (1 << 64) - 1


def fnv1a32(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def uniform(name: str, n: int) -> np.ndarray:
    """n float32 values in [0, 1): splitmix64 of (fnv1a32(name) << 32 | i), top 24 bits."""
    with np.errstate(over="ignore"):
        x = (np.uint64(fnv1a32(name)) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    m = (z >> np.uint64(40)).astype(np.float32)
    return m * np.float32(1.0 / (1 << 24))


def synthetic(name: str, shape) -> np.ndarray:
    """Deterministic value of each tensor of the state dict (same formulas as the Rust side)."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name, n)
    two, one = np.float32(2.0), np.float32(1.0)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        v = np.float32(0.5) + u  # [0.5, 1.5)
    elif leaf == "weight" and len(shape) == 1:  # batch-norm gamma
        v = np.float32(0.5) + u
    elif leaf in ("bias", "running_mean"):
        v = (two * u - one) * np.float32(0.1)
    else:  # conv / fc weight: variance 1/fan_in
        fan_in = int(np.prod(shape[1:]))
        v = (two * u - one) * np.float32(np.sqrt(3.0 / fan_in))
    return v.astype(np.float32).reshape(shape)


def images() -> np.ndarray:
    """[3, 3, 32, 32] uint8, asymmetric in x/y and per channel."""
    n, c, y, x = np.meshgrid(np.arange(3), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    v = (n * 71 + c * 37 + y * 7 + x * 3 + (x * y) % 11 + (y * y) % 13) % 256
    return v.astype(np.uint8)


ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]


def arch_inputs() -> np.ndarray:
    """[2, 3, 32, 40] float32, asymmetric in x/y and per channel, multiples of 1/32 in [-1, 1)
    (exact in float32; tests/arch_parity.rs computes the same formula)."""
    n, c, y, x = np.meshgrid(np.arange(2), np.arange(3), np.arange(32), np.arange(40), indexing="ij")
    v = (n * 71 + c * 37 + y * 7 + x * 3 + (x * y) % 11 + (y * y) % 13) % 64
    return v.astype(np.float32) / np.float32(32.0) - np.float32(1.0)


def synthetic_backbone(arch: str) -> torch.nn.Module:
    """torchvision's `arch` with the synthetic weights, eval mode, up to the average pool."""
    model = getattr(torchvision.models, arch)(weights=None)
    new = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            new[k] = v
        else:
            new[k] = torch.from_numpy(synthetic(k, tuple(v.shape)))
    model.load_state_dict(new)
    model.eval()
    return torch.nn.Sequential(*list(model.children())[:-1])


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    backbone = synthetic_backbone("resnet50")
    resnet18 = synthetic_backbone("resnet18")

    imgs = images()
    imgs.tofile(os.path.join(OUT, "images.u8"))
    for size, mean, std, name in [
        (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "features_224.f32"),
        (64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "features_64_half.f32"),
        (64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "features_resnet18_64_half.f32"),
    ]:
        tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(mean, std)])
        x = torch.stack([tf(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), "RGB")) for im in imgs])
        net = resnet18 if "resnet18" in name else backbone
        with torch.no_grad():
            f = net(x).flatten(1)
        print(name, tuple(f.shape), "mean", float(f.mean()), "std", float(f.std()), "max", float(f.max()))
        f.numpy().astype("<f4").tofile(os.path.join(OUT, name))

    # Every architecture on the small asymmetric inputs, eval mode, fp32.
    x = torch.from_numpy(arch_inputs())
    for arch in ARCHS:
        net = synthetic_backbone(arch)
        with torch.no_grad():
            f = net(x).flatten(1)
        print(arch, tuple(f.shape), "mean", float(f.mean()), "max", float(f.abs().max()))
        f.numpy().astype("<f4").tofile(os.path.join(OUT, f"arch_{arch}_32x40.f32"))
        del net

    # A tiny state dict in the real .pth zip format, with real torchvision names.
    tiny = {
        "conv1.weight": torch.from_numpy(synthetic("conv1.weight", (64, 3, 7, 7))[:2, :, :2, :3].copy()),
        "bn1.running_mean": torch.from_numpy(synthetic("bn1.running_mean", (5,))),
        "bn1.num_batches_tracked": torch.tensor(12345, dtype=torch.int64),
        "fc.bias": torch.arange(7, dtype=torch.float32) * 0.25 - 1.0,
    }
    torch.save(tiny, os.path.join(OUT, "tiny.pth"))
    save_file({k: v for k, v in tiny.items() if v.dtype == torch.float32}, os.path.join(OUT, "tiny.safetensors"))
    half = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in tiny.items()}
    torch.save(half, os.path.join(OUT, "tiny_f16.pth"))

    base = torch.zeros(1)
    shapes = {k: base.expand(v.shape) for k, v in torchvision.models.resnet101(weights=None).state_dict().items() if v.dim()}
    torch.save(shapes, os.path.join(OUT, "resnet101_shapes.pth"))

    for f in sorted(os.listdir(OUT)):
        with open(os.path.join(OUT, f), "rb") as fh:
            print(f, hashlib.sha256(fh.read()).hexdigest()[:16])


if __name__ == "__main__":
    main()
