#!/usr/bin/env python3
"""Golden fixtures for image decoding, Resize + CenterCrop and ImageFolder (tests/decode.rs,
tests/folder.rs), made with Pillow and torchvision.

Run by hand from the repository root (needs numpy, Pillow, torch, torchvision; versions in
tools/requirements.txt):

    python3 tools/gen_folder_fixtures.py

It writes, under tests/fixtures/folder/:

* decode/<name>         -- small image files in every format torchvision's ImageFolder accepts
                           (IMG_EXTENSIONS), written by Pillow or by hand where Pillow cannot
                           write the variant (16-bit PNG, 2-bit grey, plain PPM, ...), plus
                           broken ones (truncated, garbage, empty, a decompression bomb).
* decode/<name>.rgb     -- what torchvision's loader gives for it:
                           `Image.open(f).convert("RGB")` as raw [h, w, 3] bytes.
* decode/expected.json  -- per file: Pillow's mode before conversion, height, width, or the
                           exception Pillow raised; the versions used.
* resize_crop/          -- torchvision's Resize(size) + CenterCrop(crop) on PIL images of odd
                           sizes (crops larger than the image included): input.rgb / output.rgb
                           per case and cases.json.
* tree/                 -- a small ImageFolder (3 classes, nested folders, JPEG/PNG/WebP/BMP in
                           several modes, a file that is no image); tree.json lists torchvision's
                           samples (path, label) in its order, and tree_features.f32 holds the
                           synthetic ResNet-50's features (tools/gen_backbone_fixtures.py) of
                           each after Resize(40) + CenterCrop(32) + ToTensor + Normalize
                           (ImageNet), as torchvision's ImageFolder(root, transform) gives them:
                           [n, 2048] little-endian float32.
* order.json            -- a tree of tricky names (case, punctuation that sorts around "/",
                           non-ASCII, a name that is not UTF-8, hidden and symlinked folders),
                           created in a temporary directory, with torchvision's classes and
                           sample order for it (paths as hex of their bytes). The Rust test
                           builds the same tree and compares.
"""

import importlib.util
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, TiffImagePlugin, features
from torchvision import datasets, transforms

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "folder")


def versions() -> dict:
    return {
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "libwebp": features.version("webp"),
        "libtiff": features.version("libtiff"),
        "zlib": features.version("zlib"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }


def content(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] uint8: gradients that differ per axis and channel, a sharp-edged block and
    seeded noise, so that a flip, a transpose, a channel swap or an off-by-one shows."""
    y, x = np.mgrid[0:h, 0:w]
    r = x * 230 // max(w - 1, 1) + 10
    g = y * 200 // max(h - 1, 1) + 30
    b = (x * y * 7 + seed * 31) % 256
    img = np.stack([r, g, b], axis=-1).astype(np.int32)
    img[h // 4 : h // 2, w // 5 : w // 2] = [250, 20, 120]
    img += np.random.RandomState(seed).randint(-24, 25, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Hand-written files for variants Pillow does not write.


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(w: int, h: int, depth: int, ctype: int, rows: list, extra: list = ()) -> bytes:
    """A PNG from already packed scanlines (filter type 0 each)."""
    raw = b"".join(b"\x00" + r for r in rows)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    for kind, data in extra:
        out += png_chunk(kind, data)
    return out + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def png16(arr: np.ndarray, ctype: int) -> bytes:
    h, w = arr.shape[:2]
    return png_raw(w, h, 16, ctype, [arr[y].astype(">u2").tobytes() for y in range(h)])


def pack_bits(vals: np.ndarray, depth: int) -> bytes:
    """One row of `depth`-bit samples, most significant first, padded to a byte."""
    per = 8 // depth
    out = bytearray()
    for i in range(0, len(vals), per):
        byte = 0
        for j in range(per):
            v = int(vals[i + j]) if i + j < len(vals) else 0
            byte |= v << (8 - depth * (j + 1))
        out.append(byte)
    return bytes(out)


def pillow(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def decode_files() -> dict:
    """name -> file bytes."""
    f = {}
    rgb = Image.fromarray(content(21, 29, 1))
    odd = Image.fromarray(content(23, 31, 2))
    small = Image.fromarray(content(13, 19, 3))
    grey = small.convert("L")

    # JPEG: the sampling factors, progressive, grey, CMYK, restart markers, EXIF orientation.
    f["jpeg_420.jpg"] = pillow(odd, "JPEG", quality=85, subsampling=2)
    f["jpeg_422.jpg"] = pillow(odd, "JPEG", quality=85, subsampling=1)
    f["jpeg_444.jpg"] = pillow(rgb, "JPEG", quality=92, subsampling=0)
    f["jpeg_progressive.jpeg"] = pillow(odd, "JPEG", quality=80, progressive=True)
    f["jpeg_grey.jpg"] = pillow(Image.fromarray(content(21, 29, 4)).convert("L"), "JPEG", quality=85)
    cmyk = Image.fromarray(np.concatenate([content(21, 29, 5), content(21, 29, 6)[..., :1]], axis=-1), "CMYK")
    f["jpeg_cmyk.jpg"] = pillow(cmyk, "JPEG", quality=90)
    f["jpeg_restart.jpg"] = pillow(odd, "JPEG", quality=85, restart_marker_blocks=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display; the loader must NOT apply it
    f["jpeg_exif_orientation.jpg"] = pillow(rgb, "JPEG", quality=85, exif=exif)
    f["jpeg_rgb_components.jpg"] = pillow(small, "JPEG", quality=90, keep_rgb=True)
    f["jpeg_upper.JPG"] = pillow(small, "JPEG", quality=75)
    f["jpeg_q100_sharp.jpg"] = pillow(Image.fromarray(content(40, 57, 12)), "JPEG", quality=100, subsampling=2)
    f["jpeg_422_restart_rows.jpg"] = pillow(Image.fromarray(content(27, 33, 13)), "JPEG", quality=60, subsampling=1, restart_marker_rows=1)
    base = f["jpeg_420.jpg"]
    # libjpeg warnings Pillow ignores: bytes between the scan and EOI, a corrupted scan byte.
    f["jpeg_extraneous_bytes.jpg"] = base[:-2] + b"\x00\x00\x00" + base[-2:]
    sos = base.index(b"\xff\xda")
    corrupt = bytearray(base)
    corrupt[sos + 40] ^= 0x5A
    f["jpeg_corrupt_scan.jpg"] = bytes(corrupt)
    f["jpeg_truncated.jpg"] = base[: len(base) * 2 // 3]
    f["jpeg_no_eoi.jpg"] = base[:-2]
    f["jpeg_header_only.jpg"] = base[:sos]
    # Junk between two header markers: libjpeg warns while reading the header (a documented
    # difference: Pillow decodes it, TurboJPEG reports the warning as an error).
    dqt = base.index(b"\xff\xdb")
    f["jpeg_header_junk.jpg"] = base[:dqt] + b"\x00\x01" + base[dqt:]
    # SOF0 claims 60000 x 60000: must be refused before any allocation.
    sof = base.index(b"\xff\xc0")
    bomb = bytearray(base)
    bomb[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    f["jpeg_bomb.jpg"] = bytes(bomb)

    # PNG: every colour type, bit depths 1/2/4/8/16, tRNS, alpha with hidden colours.
    f["png_rgb.png"] = pillow(rgb, "PNG")
    pal = small.quantize(colors=23, method=Image.Quantize.MEDIANCUT)
    f["png_palette.png"] = pillow(pal, "PNG")
    f["png_palette_trns.png"] = pillow(pal, "PNG", transparency=bytes([0, 128, 255, 7] + [255] * 19))
    f["png_palette_4bit.png"] = pillow(small.quantize(colors=16), "PNG", bits=4)
    f["png_grey.png"] = pillow(grey, "PNG")
    f["png_grey_trns.png"] = pillow(grey, "PNG", transparency=int(np.asarray(grey)[0, 0]))
    f["png_1bit.png"] = pillow(grey.convert("1"), "PNG")
    g2 = (np.asarray(grey) >> 6).astype(np.uint8)
    f["png_grey_2bit.png"] = png_raw(19, 13, 2, 0, [pack_bits(r, 2) for r in g2])
    g4 = (np.asarray(grey) >> 4).astype(np.uint8)
    f["png_grey_4bit.png"] = png_raw(19, 13, 4, 0, [pack_bits(r, 4) for r in g4])
    la = np.stack([np.asarray(grey), content(13, 19, 7)[..., 0]], axis=-1)
    f["png_la.png"] = pillow(Image.fromarray(la, "LA"), "PNG")
    rgba = np.concatenate([content(13, 19, 8), content(13, 19, 9)[..., 2:]], axis=-1)
    rgba[0, :5, 3] = 0  # fully transparent pixels keep their colour in the file
    f["png_rgba.png"] = pillow(Image.fromarray(rgba, "RGBA"), "PNG")
    f["png_rgb_trns.png"] = pillow(small, "PNG", transparency=tuple(int(v) for v in np.asarray(small)[0, 0]))
    rs = np.random.RandomState(10)
    g16 = (np.arange(13 * 19).reshape(13, 19) * 97 % 600).astype(np.uint16)
    g16[2, :4] = [65535, 256, 255, 40000]
    f["png_grey16.png"] = png16(g16, 0)
    f["png_rgb16.png"] = png16(rs.randint(0, 65536, (13, 19, 3)), 2)
    f["png_rgba16.png"] = png16(rs.randint(0, 65536, (13, 19, 4)), 6)
    f["png_la16.png"] = png16(rs.randint(0, 65536, (13, 19, 2)), 4)
    png = f["png_rgb.png"]
    f["png_truncated.png"] = png[: len(png) // 2]
    idat = png.index(b"IDAT")
    bad_crc = bytearray(png)
    bad_crc[idat + 10] ^= 0xFF
    f["png_bad_crc.png"] = bytes(bad_crc)
    # IHDR claims 100000 x 100000 RGB; the IDAT holds a few rows.
    f["png_bomb.png"] = png_raw(100000, 100000, 8, 2, [b"\x00" * 300000] * 2)
    f["png_named.jpg"] = pillow(small, "PNG")

    # BMP, PPM/PGM, TIFF, WebP.
    f["bmp_rgb.bmp"] = pillow(rgb, "BMP")
    f["bmp_palette.bmp"] = pillow(pal, "BMP")
    f["bmp_grey.bmp"] = pillow(grey, "BMP")
    f["bmp_1bit.bmp"] = pillow(grey.convert("1"), "BMP")
    f["bmp_rgba.bmp"] = pillow(Image.fromarray(rgba, "RGBA"), "BMP")
    f["ppm_rgb.ppm"] = pillow(small, "PPM")
    f["pgm_grey.pgm"] = pillow(grey, "PPM")
    sm = np.asarray(small)
    f["ppm_plain.ppm"] = ("P3\n# plain\n19 13\n255\n" + "\n".join(" ".join(str(v) for v in row.reshape(-1)) for row in sm) + "\n").encode()
    g100 = (np.asarray(grey).astype(np.int32) * 100 // 255).astype(np.uint8)
    f["pgm_maxval100.pgm"] = b"P5\n19 13\n100\n" + g100.tobytes()
    f["pgm_16bit.pgm"] = b"P5\n19 13\n65535\n" + g16.astype(">u2").tobytes()
    g4000 = (np.asarray(grey).astype(np.int32) * 4000 // 255 + np.arange(19)).astype(">u2")
    f["pgm_maxval4000.pgm"] = b"P5 19 13 4000 " + g4000.tobytes()
    f["ppm_16bit.ppm"] = b"P6\n19 13\n65535\n" + (sm.astype(np.uint16) * 257 - np.arange(19)[None, :, None]).astype(">u2").tobytes()
    f["ppm_maxval31.ppm"] = b"P6\n#c\n19 13\n31\n" + (sm // 8).astype(np.uint8).tobytes()
    f["pgm_plain_maxval1000.pgm"] = ("P2\n19 13 1000\n" + " ".join(str(int(v) * 1000 // 255) for v in np.asarray(grey).reshape(-1)) + "\n").encode()
    bits = (np.asarray(grey) > 128).astype(np.uint8)
    f["pbm_raw.ppm"] = b"P4\n19 13\n" + b"".join(pack_bits(r, 1) for r in bits)
    f["pbm_plain.pgm"] = ("P1\n# bitmap\n19 13\n" + "\n".join("".join(str(v) for v in r) for r in bits) + "\n").encode()
    f["ppm_truncated.ppm"] = f["ppm_rgb.ppm"][:-40]
    f["tiff_rgb.tif"] = pillow(rgb, "TIFF")
    f["tiff_lzw.tiff"] = pillow(odd, "TIFF", compression="tiff_lzw")
    f["tiff_deflate.tif"] = pillow(small, "TIFF", compression="tiff_adobe_deflate")
    f["tiff_packbits.tif"] = pillow(small, "TIFF", compression="packbits")
    f["tiff_grey.tif"] = pillow(grey, "TIFF")
    f["tiff_rgba.tif"] = pillow(Image.fromarray(rgba, "RGBA"), "TIFF")
    f["tiff_palette.tif"] = pillow(pal, "TIFF")
    f["webp_lossless.webp"] = pillow(rgb, "WEBP", lossless=True)
    f["webp_lossless_rgba.webp"] = pillow(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True)
    f["webp_lossy.webp"] = pillow(odd, "WEBP", quality=80)
    f["webp_lossy_rgba.webp"] = pillow(Image.fromarray(rgba, "RGBA"), "WEBP", quality=80)
    f["webp_lossy_q30.webp"] = pillow(Image.fromarray(content(45, 37, 14)), "WEBP", quality=30, method=6)
    f["webp_lossy_q95.webp"] = pillow(Image.fromarray(content(38, 51, 15)), "WEBP", quality=95)

    # Not images, or formats outside torchvision's extensions.
    f["garbage.jpg"] = np.random.RandomState(11).randint(0, 256, 300).astype(np.uint8).tobytes()
    f["empty.png"] = b""
    f["gif_named.png"] = pillow(pal, "GIF")
    return f


def write_decode() -> None:
    out = os.path.join(OUT, "decode")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cases = []
    for name, data in sorted(decode_files().items()):
        with open(os.path.join(out, name), "wb") as fh:
            fh.write(data)
        case = {"file": name}
        try:
            with open(os.path.join(out, name), "rb") as fh:
                im = Image.open(fh)
                case["format"] = im.format
                case["mode"] = im.mode
                rgb = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 -- every failure is an expected outcome here
            # Without the absolute path Pillow puts in some messages.
            case["error"] = f"{type(e).__name__}: {e}".replace(os.path.join(out, name), name)
        else:
            arr = np.asarray(rgb)
            case["height"], case["width"] = arr.shape[:2]
            arr.tofile(os.path.join(out, name + ".rgb"))
        cases.append(case)
        print(name, len(data), {k: v for k, v in case.items() if k != "file"})
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump({"versions": versions(), "cases": cases}, fh, indent=1)
        fh.write("\n")


# ---------------------------------------------------------------------------------------------
# Resize + CenterCrop.

CROP_CASES = [
    # (h, w, resize, crop): odd differences exercise Python's round-half-even offsets; crops
    # larger than the resized image exercise the zero padding.
    (13, 19, 16, 12),
    (19, 13, 16, 11),
    (40, 40, 40, 32),
    (37, 50, 24, 21),
    (50, 37, 24, 21),
    (7, 30, 9, 8),
    (30, 5, 6, 10),
    (21, 29, 12, 16),
    (33, 45, 32, 33),
    (64, 48, 37, 36),
]


def write_resize_crop() -> None:
    out = os.path.join(OUT, "resize_crop")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cases = []
    for i, (h, w, size, crop) in enumerate(CROP_CASES):
        src = content(h, w, 20 + i)
        tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(crop)])
        dst = np.asarray(tf(Image.fromarray(src)))
        src.tofile(os.path.join(out, f"case{i}_input.rgb"))
        dst.tofile(os.path.join(out, f"case{i}_output.rgb"))
        cases.append({"input": f"case{i}_input.rgb", "output": f"case{i}_output.rgb", "height": h, "width": w, "resize": size, "crop": crop})
    with open(os.path.join(out, "cases.json"), "w") as fh:
        json.dump({"versions": versions(), "cases": cases}, fh, indent=1)
        fh.write("\n")


# ---------------------------------------------------------------------------------------------
# ImageFolder end to end.


def tree_files() -> dict:
    """Relative path -> bytes: 3 classes, nested folders (including `sub` beside `sub-a`, whose
    order differs between a depth-first walk and torchvision's sorted os.walk), mixed formats,
    modes and sizes, upper-case extensions and a file that is not an image."""
    t = {}
    t["bird/b1.png"] = pillow(Image.fromarray(np.concatenate([content(26, 19, 30), content(26, 19, 31)[..., :1]], axis=-1), "RGBA"), "PNG")
    t["bird/nested/b2.JPG"] = pillow(Image.fromarray(content(17, 23, 32)).convert("L"), "JPEG", quality=85)
    t["bird/notes.txt"] = b"not an image\n"
    t["cat/c1.jpg"] = pillow(Image.fromarray(content(31, 22, 33)), "JPEG", quality=85)
    t["cat/c 3.png"] = pillow(Image.fromarray(content(20, 28, 34)).quantize(colors=40), "PNG")
    t["cat/c2.webp"] = pillow(Image.fromarray(content(25, 25, 35)), "WEBP", lossless=True)
    t["dog/d1.jpeg"] = pillow(Image.fromarray(content(24, 24, 36)), "JPEG", quality=80, progressive=True)
    g16 = (content(18, 27, 37)[..., 0].astype(np.uint16) * 3)
    t["dog/d2.png"] = png16(g16, 0)
    t["dog/sub-a/d3.jpg"] = pillow(Image.fromarray(content(29, 21, 38)), "JPEG", quality=90, subsampling=1)
    t["dog/sub/d4.bmp"] = pillow(Image.fromarray(content(19, 30, 39)), "BMP")
    t["dog/sub/deeper/d5.png"] = pillow(Image.fromarray(content(22, 17, 40)), "PNG")
    return t


def load_synthetic_backbone():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen_backbone_fixtures.py")
    spec = importlib.util.spec_from_file_location("gen_backbone_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.synthetic_backbone("resnet50")


def write_tree() -> None:
    out = os.path.join(OUT, "tree")
    shutil.rmtree(out, ignore_errors=True)
    for rel, data in tree_files().items():
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        with open(os.path.join(out, rel), "wb") as fh:
            fh.write(data)
    tf = transforms.Compose(
        [
            transforms.Resize(40),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ds = datasets.ImageFolder(out, transform=tf)
    torch.manual_seed(0)
    net = load_synthetic_backbone()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        feats = net(x).flatten(1)
    feats.numpy().astype("<f4").tofile(os.path.join(OUT, "tree_features.f32"))
    samples = [[os.path.relpath(p, out), label] for p, label in ds.samples]
    print("tree", ds.classes, samples, tuple(feats.shape))
    with open(os.path.join(OUT, "tree.json"), "w") as fh:
        json.dump(
            {
                "versions": versions(),
                "transform": "Resize(40), CenterCrop(32), ToTensor, Normalize(ImageNet)",
                "classes": ds.classes,
                "samples": samples,
            },
            fh,
            indent=1,
        )
        fh.write("\n")


# ---------------------------------------------------------------------------------------------
# Sample order on tricky names.

ORDER_FILES = [
    # (class dir, relative path as bytes)
    (b"Zebra", b"z.jpg"),
    (b"apple", b"b.JPEG"),
    (b"apple", b"a.png"),
    (b"apple", b"A.png"),
    (b"apple", b"_.jpg"),
    (b"apple", b".jpg"),
    (b"apple", b"c.txt"),
    (b"apple", b"d.jpg.bak"),
    (b"apple", b"e.gif"),
    (b"apple", b"f.TiFf"),
    (b"apple", b"g.webp"),
    (b"apple", b"h.pgm"),
    (b"apple", b"i.ppm"),
    (b"apple", b"j.bmp"),
    (b"apple", b"k.tif"),
    (b"apple", "\u00e9.jpg".encode()),
    (b"apple", "\U0001f600.jpg".encode()),
    (b"apple", b"\xf5\xff.jpg"),
    (b"apple", b"z.jpg"),
    (b"apple", b"sub/x.jpg"),
    (b"apple", b"sub/y/z.jpg"),
    (b"apple", b"sub-a/x.jpg"),
    (b"apple", b"sub a/x.jpg"),
    (b"apple", b"sub0/x.jpg"),
    (b"apple", b"Sub/x.jpg"),
    (b"apple", b"sub.d/x.jpg"),
    (b".hidden", b"h.jpg"),
    (b"banana", b"x.jpg"),
]
ORDER_OUTSIDE = [b"outside/o1.jpg", b"outside/deep/o2.png"]


def write_order() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(os.fsencode(tmp), b"tree")
        for cls, rel in ORDER_FILES:
            p = os.path.join(root, cls, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").close()
        for rel in ORDER_OUTSIDE:
            p = os.path.join(os.fsencode(tmp), rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").close()
        os.symlink(b"../../outside", os.path.join(root, b"banana", b"linked"))
        os.symlink(b"../outside", os.path.join(root, b"linked_class"))
        sroot = os.fsdecode(root)
        classes, class_to_idx = datasets.folder.find_classes(sroot)
        samples = datasets.folder.make_dataset(sroot, class_to_idx, extensions=datasets.folder.IMG_EXTENSIONS)
        expected = [[os.fsencode(os.path.relpath(p, sroot)).hex(), label] for p, label in samples]
        print("order", classes, [(bytes.fromhex(p), l) for p, l in expected])
    with open(os.path.join(OUT, "order.json"), "w") as fh:
        json.dump(
            {
                "versions": versions(),
                "files": [os.path.join(c, r).hex() for c, r in ORDER_FILES],
                "outside": [r.hex() for r in ORDER_OUTSIDE],
                "links": [
                    {"link": b"tree/banana/linked".hex(), "target": b"../../outside".hex()},
                    {"link": b"tree/linked_class".hex(), "target": b"../outside".hex()},
                ],
                "classes": [os.fsencode(c).hex() for c in classes],
                "samples": expected,
            },
            fh,
            indent=1,
        )
        fh.write("\n")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    what = sys.argv[1:] or ["decode", "resize_crop", "tree", "order"]
    if "decode" in what:
        write_decode()
    if "resize_crop" in what:
        write_resize_crop()
    if "tree" in what:
        write_tree()
    if "order" in what:
        write_order()


if __name__ == "__main__":
    main()
