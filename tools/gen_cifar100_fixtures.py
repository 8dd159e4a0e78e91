#!/usr/bin/env python3
"""Generates the tiny CIFAR-100 fixtures used by tests/cifar100.rs, in both real layouts,
and scikit-learn's metrics at 100 and 20 classes for tests/classes100.rs.

Run by hand from the repository root (needs numpy, torch, torchvision, scikit-learn; reuses
the Python 2 pickler and the image maker of tools/gen_data_fixtures.py):

    python3 tools/gen_cifar100_fixtures.py

Everything is seeded, so a rerun with the same library versions rewrites identical files;
the script prints the sha256 of every file it writes.

Writes, under tests/fixtures/cifar100/:
  cifar-100-binary/  train.bin (6 records), test.bin (4 records): 3,074-byte records, the
                     coarse label byte, the fine label byte, then the R, G, B planes;
                     coarse_label_names.txt, fine_label_names.txt (one name per line)
  cifar-100-python/  train, test: the same records as pickled dicts laid out like the real
                     files (Python 2 cPickle, protocol 2, byte-string keys b'filenames',
                     b'batch_label', b'fine_labels', b'coarse_labels', b'data'); meta: a
                     dict with b'fine_label_names' and b'coarse_label_names'
  expected.json      per part: the fine and coarse labels and the sha256 of every image's
                     3,072 bytes, which the tests compare both readers with
  metrics.json       for a fine (100-class) and a coarse (20-class) case: labels and
                     predictions, scikit-learn's confusion matrix, precision, recall, F1,
                     support, averages and classification_report text, and the ten most
                     confused pairs (largest off-diagonal cells) computed with numpy

The labels span both ranges (fine 0 and 99, coarse 0 and 19 occur) and every fine label
sits in its real superclass. The python fixture is read back by torchvision's own CIFAR100
class (md5 checks disabled, the files being fixtures), which must see the same images, fine
labels and class names.
"""

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import sklearn
import torchvision
import torchvision.datasets.cifar as tv_cifar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_data_fixtures import make_image, py2_pickle  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "cifar100"

# The 20 superclasses and their classes, as the dataset page lists them, with the names the
# dataset's files use; label ids are positions in the sorted lists, as in the real files.
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
COARSE = sorted(SUPERCLASSES)
FINE = sorted(c for cs in SUPERCLASSES.values() for c in cs)
assert len(COARSE) == 20 and len(FINE) == 100 and len(set(FINE)) == 100
SUPER_OF = {c: COARSE.index(s) for s, cs in SUPERCLASSES.items() for c in cs}

# Fine labels of the records, scrambled; their coarse labels follow from the superclasses.
TRAIN_FINE = [99, 0, 57, 13, 71, 30]   # worm, apple, pear, bus, sea, dolphin
TEST_FINE = [1, 98, 85, 64]           # aquarium_fish, woman, tank, possum

written = []


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(path)


def coarse_of(fine_labels):
    return [SUPER_OF[FINE[f]] for f in fine_labels]


def metrics_case(y_true, y_pred, names):
    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                 zero_division=0)
    avg = {}
    for a in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                        average=a, zero_division=0)
        avg[a] = {"precision": ap, "recall": ar, "f1": af}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    # The most confused pairs: off-diagonal cells, most images first, ties by (true, pred).
    cells = [(-int(cm[t, q]), t, q) for t in labels for q in labels if t != q and cm[t, q] > 0]
    top = sorted(cells)[:10]
    return {
        "classes": names,
        "y_true": [int(v) for v in y_true],
        "y_pred": [int(v) for v in y_pred],
        "confusion": cm.tolist(),
        "precision": p.tolist(),
        "recall": r.tolist(),
        "f1": f.tolist(),
        "support": s.tolist(),
        "accuracy": accuracy_score(y_true, y_pred),
        "macro": avg["macro"],
        "weighted": avg["weighted"],
        "report": classification_report(y_true, y_pred, labels=labels, target_names=names,
                                        digits=2, zero_division=0),
        "most_confused": [{"true": t, "predicted": q, "count": -c,
                           "share": -c / int(cm[t].sum())} for c, t, q in top],
    }


def gen_metrics():
    rng = np.random.default_rng(100)
    cases = {}
    for name, names in [("fine", FINE), ("coarse", COARSE)]:
        k = len(names)
        n = 600 if k == 100 else 300
        # Class 1 never occurs and class 0 is never predicted, so that 0/0 appears; the
        # accuracy rises with the class id; mistakes favour a neighbouring class.
        y_true = rng.integers(2, k, n)
        hit = rng.random(n) < np.linspace(0.1, 0.95, k)[y_true]
        near = (y_true + rng.integers(1, 3, n)) % k
        y_pred = np.where(hit, y_true, np.where(rng.random(n) < 0.6, near,
                                                 rng.integers(0, k, n)))
        y_pred = np.where(y_pred == 0, 2, y_pred)
        cases[name] = metrics_case(y_true, y_pred, names)
    cases["versions"] = {"numpy": np.__version__, "scikit-learn": sklearn.__version__}
    write(OUT / "metrics.json", (json.dumps(cases) + "\n").encode())


def main():
    gen_metrics()
    rng = np.random.RandomState(20240613)
    parts = {
        "train": (b"training batch 1 of 1", TRAIN_FINE),
        "test": (b"testing batch 1 of 1", TEST_FINE),
    }
    coarse_all = coarse_of(TRAIN_FINE + TEST_FINE)
    assert {0, 19} <= set(coarse_all) and {0, 99} <= set(TRAIN_FINE + TEST_FINE)
    expected = {"fine_classes": FINE, "coarse_classes": COARSE, "parts": {}}
    for stem, (batch_label, fine) in parts.items():
        coarse = coarse_of(fine)
        imgs = np.stack([make_image(rng, 32, 32) for _ in fine])
        records = b"".join(bytes([c, f]) + img.tobytes()
                           for img, c, f in zip(imgs, coarse, fine))
        write(OUT / "cifar-100-binary" / f"{stem}.bin", records)
        names = [f"fixture_{stem}_{i}.png".encode() for i in range(len(fine))]
        d = {
            b"filenames": names,
            b"batch_label": batch_label,
            b"fine_labels": list(fine),
            b"coarse_labels": coarse,
            b"data": imgs.reshape(len(fine), 3072),
        }
        blob = py2_pickle(d)
        back = pickle.loads(blob, encoding="bytes")
        assert back[b"fine_labels"] == fine and back[b"coarse_labels"] == coarse
        assert np.array_equal(back[b"data"], d[b"data"])
        write(OUT / "cifar-100-python" / stem, blob)
        expected["parts"][stem] = {
            "fine": fine,
            "coarse": coarse,
            "image_sha256": [hashlib.sha256(img.tobytes()).hexdigest() for img in imgs],
        }
    write(OUT / "cifar-100-binary" / "fine_label_names.txt", ("\n".join(FINE) + "\n").encode())
    write(OUT / "cifar-100-binary" / "coarse_label_names.txt",
          ("\n".join(COARSE) + "\n").encode())
    write(OUT / "cifar-100-python" / "meta", py2_pickle({
        b"fine_label_names": [c.encode() for c in FINE],
        b"coarse_label_names": [c.encode() for c in COARSE],
    }))
    expected["generator"] = "tools/gen_cifar100_fixtures.py"
    expected["versions"] = {"python": sys.version.split()[0], "numpy": np.__version__,
                            "torchvision": torchvision.__version__}
    write(OUT / "expected.json", (json.dumps(expected, indent=2) + "\n").encode())

    # torchvision reads the python fixture as it reads the real files.
    tv_cifar.check_integrity = lambda *a, **k: True
    for train, stem in [(True, "train"), (False, "test")]:
        ds = torchvision.datasets.CIFAR100(str(OUT), train=train, download=False)
        assert ds.classes == FINE
        assert ds.targets == expected["parts"][stem]["fine"]
        for i, img in enumerate(ds.data):
            chw = np.ascontiguousarray(img.transpose(2, 0, 1))
            assert hashlib.sha256(chw.tobytes()).hexdigest() == \
                expected["parts"][stem]["image_sha256"][i]

    total = 0
    for p in sorted(set(written)):
        data = p.read_bytes()
        total += len(data)
        print(f"{hashlib.sha256(data).hexdigest()}  {len(data):>8}  {p.relative_to(ROOT)}")
    print(f"{total} bytes in {len(set(written))} files")


if __name__ == "__main__":
    main()
