#!/usr/bin/env python3
"""Generates the CIFAR-10 reader and preprocessing fixtures used by tests/data.rs.

Run by hand from the repository root (needs numpy, Pillow, torch, torchvision, safetensors):

    python3 tools/gen_data_fixtures.py

Everything is seeded, so a rerun with the same library versions rewrites identical files;
the script prints the sha256 of every file it writes.

Writes
  tests/fixtures/cifar/cifar-10-batches-bin/   data_batch_1..5.bin (3 records each),
                                               test_batch.bin (4 records), batches.meta.txt
  tests/fixtures/cifar/cifar-10-batches-py/    the same records as pickles laid out exactly
                                               like the real files (Python 2 cPickle,
                                               protocol 2, byte strings as BINSTRING,
                                               numpy.core.multiarray._reconstruct)
  tests/fixtures/cifar/pickle-variants/        the first 2 test records pickled by this
                                               Python/numpy with protocols 2, 3, 4 and 5
  tests/fixtures/transform/cases.safetensors   inputs ("src/<name>", u8 [3,h,w]) and
                                               expected outputs ("out/<case>") of Pillow's
                                               resize and torchvision's full preprocessing
  tests/fixtures/transform/manifest.json       what each case is
  tests/fixtures/transform/*.png, *.jpg        small images for load_image

The torchvision cases run torchvision's own CIFAR10 dataset class over the python fixture
(its md5 check disabled, the files being fixtures), with
transforms.Compose([Resize(size), ToTensor(), Normalize(mean, std)]).
"""

import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import PIL
import safetensors
import safetensors.numpy
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT / "tests" / "fixtures" / "cifar"
TRANSFORM = ROOT / "tests" / "fixtures" / "transform"

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
NORMS = {"imagenet": IMAGENET, "half": HALF}

TRAIN_PER_BATCH = 3
TEST_COUNT = 4

written = []


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(path)


def make_image(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    """[3, h, w] uint8: gradients, stripes and noise, different in every channel, with
    0 and 255 present and pixel (0, 1) != pixel (1, 0) in every channel."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    noise = rng.randint(0, 256, size=(3, h, w)).astype(np.float64)
    mix = rng.uniform(0.2, 0.8)
    r = (x * 255 / max(w - 1, 1)) * (1 - mix) + noise[0] * mix
    g = (y * 255 / max(h - 1, 1)) * (1 - mix) + noise[1] * mix
    b = ((x + 3 * y) % 5) * 60 * (1 - mix) + noise[2] * mix
    img = np.stack([r, g, b]).round().clip(0, 255).astype(np.uint8)
    img[:, 0, 1] = [250, 10, 128]
    img[:, 1, 0] = [5, 240, 60]
    img[0, h - 1, w - 1] = 255
    img[1, h - 1, 0] = 0
    assert all(img[c, 0, 1] != img[c, 1, 0] for c in range(3))
    assert not np.array_equal(img[0], img[1]) and not np.array_equal(img[1], img[2])
    return img


# ---------------------------------------------------------------------------
# Python 2 cPickle, protocol 2, as the real CIFAR-10 python batches were written.
# ---------------------------------------------------------------------------
class Py2Pickler:
    """Emits the opcodes Python 2's cPickle writes for dicts of str, int, list and numpy
    uint8 arrays (numpy 1.x: _reconstruct + BUILD with a version-1 state)."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self):
        if self.memo < 256:
            self.out += b"q" + bytes([self.memo])
        else:
            self.out += b"r" + struct.pack("<I", self.memo)
        self.memo += 1

    def str_(self, b: bytes):
        if len(b) < 256:
            self.out += b"U" + bytes([len(b)]) + b
        else:
            self.out += b"T" + struct.pack("<i", len(b)) + b
        self.put()

    def int_(self, v: int):
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def global_(self, module: str, name: str):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put()

    def value(self, v):
        if isinstance(v, bytes):
            self.str_(v)
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, list):
            self.list_(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        else:
            raise TypeError(type(v))

    def list_(self, items):
        self.out += b"]"
        self.put()
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            if len(chunk) == 1:
                self.value(chunk[0])
                self.out += b"a"
            else:
                self.out += b"("
                for item in chunk:
                    self.value(item)
                self.out += b"e"

    def dict_(self, d):
        self.out += b"}"
        self.put()
        self.out += b"("
        for k, v in d.items():
            self.str_(k)
            self.value(v)
        self.out += b"u"

    def array(self, a: np.ndarray):
        assert a.dtype == np.uint8 and a.flags.c_contiguous and a.ndim == 2
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.int_(0)
        self.out += b"\x85"  # TUPLE1
        self.put()
        self.str_(b"b")
        self.out += b"\x87"  # TUPLE3
        self.put()
        self.out += b"R"
        self.put()
        self.out += b"("
        self.int_(1)
        for d in a.shape:
            self.int_(d)
        self.out += b"\x86"  # TUPLE2: the shape (N, 3072)
        self.put()
        self.global_("numpy", "dtype")
        self.str_(b"u1")
        self.int_(0)
        self.int_(1)
        self.out += b"\x87"
        self.put()
        self.out += b"R"
        self.put()
        self.out += b"("
        self.int_(3)
        self.str_(b"|")
        self.out += b"NNN"
        self.out += b"J" + struct.pack("<i", -1)
        self.out += b"J" + struct.pack("<i", -1)
        self.int_(0)
        self.out += b"t"
        self.put()
        self.out += b"b"  # BUILD the dtype
        self.out += b"\x89"  # not Fortran order
        self.str_(a.tobytes())
        self.out += b"t"
        self.put()
        self.out += b"b"  # BUILD the array

    def finish(self) -> bytes:
        return bytes(self.out) + b"."


def py2_pickle(d) -> bytes:
    p = Py2Pickler()
    p.dict_(d)
    return p.finish()


def batch_dict(label: bytes, images: np.ndarray, labels, names):
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(labels), 3072),
        b"filenames": names,
    }


def check_roundtrip(blob: bytes, d, py2: bool):
    """The written pickle loads in Python 3 as bytes and, for the Python 2 layout, the way
    torchvision reads it (latin1: Python 2 strings become str keys)."""
    back = pickle.loads(blob, encoding="bytes")
    assert back[b"labels"] == d[b"labels"]
    assert np.array_equal(back[b"data"], d[b"data"]) and back[b"data"].dtype == np.uint8
    if py2:
        tv = pickle.loads(blob, encoding="latin1")
        assert tv["labels"] == d[b"labels"] and np.array_equal(tv["data"], d[b"data"])


def gen_cifar():
    rng = np.random.RandomState(20240601)
    n_train = 5 * TRAIN_PER_BATCH
    train_imgs = np.stack([make_image(rng, 32, 32) for _ in range(n_train)])
    test_imgs = np.stack([make_image(rng, 32, 32) for _ in range(TEST_COUNT)])
    # Every class appears among the training labels, in a scrambled order.
    train_labels = [(7 * i + 3) % 10 for i in range(n_train)]
    test_labels = [9, 0, 4, 6]

    bin_dir = CIFAR / "cifar-10-batches-bin"
    py_dir = CIFAR / "cifar-10-batches-py"
    batches = []
    for b in range(5):
        sl = slice(b * TRAIN_PER_BATCH, (b + 1) * TRAIN_PER_BATCH)
        batches.append((f"data_batch_{b + 1}", f"training batch {b + 1} of 5".encode(),
                        train_imgs[sl], train_labels[sl]))
    batches.append(("test_batch", b"testing batch 1 of 1", test_imgs, test_labels))

    for stem, batch_label, imgs, labels in batches:
        records = b"".join(bytes([l]) + img.tobytes() for img, l in zip(imgs, labels))
        write(bin_dir / f"{stem}.bin", records)
        names = [f"fixture_{stem}_{i}.png".encode() for i in range(len(labels))]
        d = batch_dict(batch_label, imgs, labels, names)
        blob = py2_pickle(d)
        check_roundtrip(blob, d, py2=True)
        write(py_dir / stem, blob)
    # The real batches.meta.txt: one name per line, then a blank line.
    write(bin_dir / "batches.meta.txt", ("\n".join(CLASSES) + "\n\n").encode())
    write(py_dir / "batches.meta", py2_pickle({
        b"num_cases_per_batch": 10000,
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": 3072,
    }))

    # Pickles as today's Python and numpy write them, for the reader's other code paths.
    d = batch_dict(b"testing batch 1 of 1", test_imgs[:2], test_labels[:2],
                   [b"a.png", b"b.png"])
    for proto in (2, 3, 4, 5):
        blob = pickle.dumps(d, protocol=proto)
        check_roundtrip(blob, d, py2=False)
        write(CIFAR / "pickle-variants" / f"test_batch.protocol{proto}", blob)
    return test_imgs


def tv_dataset(size, norm):
    """torchvision's CIFAR10 over the python fixture, with the md5 checks disabled."""
    tv_cifar.check_integrity = lambda *a, **k: True
    mean, std = NORMS[norm]
    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    return torchvision.datasets.CIFAR10(str(CIFAR), train=False, download=False, transform=tf)


def pil_of(chw: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))


def gen_transform(test_imgs):
    rng = np.random.RandomState(20240602)
    tensors = {}
    cases = []

    def src(name, chw):
        tensors[f"src/{name}"] = np.ascontiguousarray(chw)

    def pil_case(name, source, oh, ow):
        chw = tensors[f"src/{source}"]
        out = np.asarray(pil_of(chw).resize((ow, oh), Image.BILINEAR)).transpose(2, 0, 1)
        tensors[f"out/{name}"] = np.ascontiguousarray(out)
        cases.append({"name": name, "src": source, "kind": "pil_resize", "out_hw": [oh, ow]})

    def tv_case(name, source, size, norm, row_step, tensor):
        t = tensor.numpy()[:, ::row_step, :]
        tensors[f"out/{name}"] = np.ascontiguousarray(t.astype(np.float32))
        cases.append({"name": name, "src": source, "kind": "torchvision", "size": size,
                      "norm": norm, "row_step": row_step,
                      "out_hw": [int(tensor.shape[1]), int(tensor.shape[2])]})

    for i in range(TEST_COUNT):
        src(f"cifar_test_{i}", test_imgs[i])

    # torchvision's full preprocessing on CIFAR images, via its CIFAR10 dataset class.
    # At 224 only every row_step-th row is stored, to keep the fixtures small; the
    # resize itself is checked on every pixel by the Pillow cases.
    for name, i, size, norm, step in [
        ("tv_test0_224_imagenet", 0, 224, "imagenet", 9),
        ("tv_test1_224_half", 1, 224, "half", 16),
        ("tv_test2_64_imagenet", 2, 64, "imagenet", 1),
        ("tv_test3_48_half", 3, 48, "half", 1),
    ]:
        ds = tv_dataset(size, norm)
        tensor, label = ds[i]
        assert np.array_equal(ds.data[i].transpose(2, 0, 1), test_imgs[i])
        tv_case(name, f"cifar_test_{i}", size, norm, step, tensor)

    # Pillow's bilinear resize, every pixel: upscaling, downscaling, non-square images,
    # and sizes where Pillow skips one of its two passes.
    pil_case("pil_test0_224", "cifar_test_0", 224, 224)
    pil_case("pil_test1_64", "cifar_test_1", 64, 64)
    wide = make_image(rng, 37, 50)   # h=37, w=50
    tall = make_image(rng, 50, 37)   # h=50, w=37
    src("wide_37x50", wide)
    src("tall_50x37", tall)
    pil_case("pil_wide_down_17x23", "wide_37x50", 17, 23)
    pil_case("pil_wide_down_3x5", "wide_37x50", 3, 5)
    pil_case("pil_wide_mixed_45x29", "wide_37x50", 45, 29)
    pil_case("pil_wide_only_vertical_20x50", "wide_37x50", 20, 50)
    pil_case("pil_wide_only_horizontal_37x80", "wide_37x50", 37, 80)
    pil_case("pil_tall_up_71x45", "tall_50x37", 71, 45)
    pil_case("pil_tall_down_1x1", "tall_50x37", 1, 1)
    pil_case("pil_tall_down_49x36", "tall_50x37", 49, 36)

    # torchvision Resize(int) on non-square PIL images: output size rule and downscaling.
    for name, source, size, norm in [
        ("tv_wide_24_imagenet", "wide_37x50", 24, "imagenet"),
        ("tv_tall_16_half", "tall_50x37", 16, "half"),
    ]:
        mean, std = NORMS[norm]
        tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                                 transforms.Normalize(mean, std)])
        tv_case(name, source, size, norm, 1, tf(pil_of(tensors[f"src/{source}"])))

    # Images for load_image: a PNG (decoded exactly by any decoder) and a JPEG.
    images = []
    png = make_image(rng, 30, 40)
    pil_of(png).save(TRANSFORM / "rgb_30x40.png", optimize=False)
    written.append(TRANSFORM / "rgb_30x40.png")
    jpg = make_image(rng, 20, 24)
    pil_of(jpg).save(TRANSFORM / "noisy_20x24.jpg", quality=90)
    written.append(TRANSFORM / "noisy_20x24.jpg")
    for file, name in [("rgb_30x40.png", "png_rgb_30x40"), ("noisy_20x24.jpg", "jpeg_20x24")]:
        pil = Image.open(TRANSFORM / file).convert("RGB")
        src(name, np.asarray(pil).transpose(2, 0, 1))
        images.append({"file": file, "src": name, "exact": file.endswith(".png")})
    mean, std = IMAGENET
    tf = transforms.Compose([transforms.Resize(20), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    tv_case("tv_png_20_imagenet", "png_rgb_30x40", 20, "imagenet", 1,
            tf(Image.open(TRANSFORM / "rgb_30x40.png").convert("RGB")))

    safetensors.numpy.save_file(tensors, str(TRANSFORM / "cases.safetensors"))
    written.append(TRANSFORM / "cases.safetensors")
    manifest = {
        "generator": "tools/gen_data_fixtures.py",
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "pillow": PIL.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
        "norms": {k: {"mean": v[0], "std": v[1]} for k, v in NORMS.items()},
        "cases": cases,
        "images": images,
    }
    write(TRANSFORM / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def main():
    torch.manual_seed(0)
    test_imgs = gen_cifar()
    TRANSFORM.mkdir(parents=True, exist_ok=True)
    gen_transform(test_imgs)
    total = 0
    for p in sorted(set(written)):
        data = p.read_bytes()
        total += len(data)
        print(f"{hashlib.sha256(data).hexdigest()}  {len(data):>8}  {p.relative_to(ROOT)}")
    print(f"{total} bytes in {len(set(written))} files")


if __name__ == "__main__":
    main()
