#!/usr/bin/env python3
"""Golden fixtures for the head, its optimiser and the metrics (run by hand; CI has no Python).

    python3 tools/gen_head_fixtures.py        # writes tests/fixtures/head/*.json

1. `sgd_trajectory.json`: our default head, nn.Sequential(Linear(2048, 32), ReLU,
   Linear(32, 10)), trained in PyTorch with CrossEntropyLoss + λ/2·(‖W1‖²+‖W2‖²) and
   torch.optim.SGD(lr, momentum) at batch size 4 for a few hundred steps. The features, labels
   and initial weights are not stored: both sides regenerate them bit for bit from an integer
   hash (lowbias32) of each element's index, so the fixture stays a few KB. Stored: the data
   order, the loss and penalty of every step, the final weights' sums and a few values, and
   the gradients of one odd-sized batch.
   `sgd_trajectory_linear.json`: the same for the course script's own head, Linear(2048, 32)
   then Linear(32, 10) with nothing between them (`fc2(dropout(fc1(x)))` with dropout off:
   nn.Identity in the ReLU's place), λ = 0 as the script.
2. `metrics.json`: y_true / y_pred arrays and scikit-learn's confusion matrix, precision,
   recall, F1, support, averages and classification_report strings.
3. `top_k.json`: scores (with ties) and labels, and scikit-learn's top_k_accuracy_score for
   k = 1 … 10.
4. `eval_val.json`: a small validation set and head, both regenerated from the hash on the
   Rust side, the head's softmax probabilities computed here in float64 numpy, and
   scikit-learn's metrics of them (accuracy, top-5, confusion matrix, precision, recall, F1,
   support, classification_report): what `test --split val` must write into
   metrics-val.json.

Every file records the versions of torch, numpy and scikit-learn that made it.
"""

import json
import math
import os
import warnings

import numpy as np
import sklearn
import torch
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.exceptions import UndefinedMetricWarning

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "head")
M = 0xFFFFFFFF
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def h32(x):
    """lowbias32 (Chris Wellons): a 32-bit integer hash."""
    x &= M
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    x ^= x >> 16
    return x


def uniform(tag, i):
    """A value in [-1, 1) with 24 significant bits (exact in f32), from (tag, index)."""
    h = h32(h32(tag) ^ i)
    return ((h >> 8) / float(1 << 24)) * 2.0 - 1.0


def label(n, classes):
    return h32(h32(6) ^ n) % classes


def features(n_rows, dim, classes):
    """x[n, i] = 0.5·u(1, n·D+i) + 0.3·[i mod C == y_n], computed in f64 then cast to f32."""
    x = np.empty((n_rows, dim), dtype=np.float64)
    for n in range(n_rows):
        y = label(n, classes)
        for i in range(dim):
            x[n, i] = 0.5 * uniform(1, n * dim + i) + (0.3 if i % classes == y else 0.0)
    return x.astype(np.float32)


def init_weights(dim, hidden, classes):
    """Weights u(tag, flat index)·(1/√fan_in), in f64 then cast to f32."""
    s1 = 1.0 / math.sqrt(dim)
    s2 = 1.0 / math.sqrt(hidden)
    w1 = np.array([uniform(2, k) * s1 for k in range(hidden * dim)]).reshape(hidden, dim)
    b1 = np.array([uniform(3, k) * s1 for k in range(hidden)])
    w2 = np.array([uniform(4, k) * s2 for k in range(classes * hidden)]).reshape(classes, hidden)
    b2 = np.array([uniform(5, k) * s2 for k in range(classes)])
    return [a.astype(np.float32) for a in (w1, b1, w2, b2)]


def versions():
    return {"torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__}


def head_model(dim, hidden, classes, activation="relu"):
    w1, b1, w2, b2 = init_weights(dim, hidden, classes)
    act = torch.nn.ReLU() if activation == "relu" else torch.nn.Identity()
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), act, torch.nn.Linear(hidden, classes)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1))
        model[0].bias.copy_(torch.from_numpy(b1))
        model[2].weight.copy_(torch.from_numpy(w2))
        model[2].bias.copy_(torch.from_numpy(b2))
    return model


def objective(model, xb, yb, lam):
    ce = torch.nn.functional.cross_entropy(model(xb), yb)
    pen = lam / 2 * (model[0].weight.pow(2).sum() + model[2].weight.pow(2).sum())
    return ce, pen


def trajectory(activation="relu", lam=0.05, seed=20240611):
    dim, hidden, classes = 2048, 32, 10
    n, batch, epochs = 50, 4, 25  # 13 steps per epoch, the last one of 2 samples
    lr, momentum = 0.01, 0.9
    x = torch.from_numpy(features(n, dim, classes))
    y = torch.tensor([label(i, classes) for i in range(n)], dtype=torch.long)
    model = head_model(dim, hidden, classes, activation)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rng = np.random.default_rng(seed)
    order, losses, penalties = [], [], []
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, batch):
            idx = perm[s : s + batch].tolist()
            order.append(idx)
            opt.zero_grad()
            ce, pen = objective(model, x[idx], y[idx], lam)
            (ce + pen).backward()
            opt.step()
            losses.append(ce.item())
            penalties.append(pen.item())

    # Gradients of one odd-sized batch (5 samples) at the initial weights, λ = 0.1.
    g_model = head_model(dim, hidden, classes, activation)
    gidx = [3, 17, 42, 8, 29]
    ce, pen = objective(g_model, x[gidx], y[gidx], 0.1)
    (ce + pen).backward()
    gw1 = g_model[0].weight.grad.double()

    final = {
        "w1_sum": model[0].weight.detach().double().sum().item(),
        "w1_abs_sum": model[0].weight.detach().double().abs().sum().item(),
        "w1_first": model[0].weight.detach().flatten()[:16].tolist(),
        "b1": model[0].bias.detach().tolist(),
        "w2": model[2].weight.detach().flatten().tolist(),
        "b2": model[2].bias.detach().tolist(),
    }
    w1, _, _, _ = init_weights(dim, hidden, classes)
    return {
        "generator": "tools/gen_head_fixtures.py",
        "torch": torch.__version__,
        "versions": versions(),
        "activation": activation,
        "dims": {"input": dim, "hidden": hidden, "classes": classes},
        "n": n,
        "lr": lr,
        "momentum": momentum,
        "lambda": lam,
        "batch_size": batch,
        # Checks that the Rust side regenerated the same inputs before comparing losses.
        "check": {
            "x_sum": float(x.double().sum()),
            "x_first": x[0, :8].tolist(),
            "labels": y.tolist(),
            "w1_init_sum": float(w1.astype(np.float64).sum()),
        },
        "order": order,
        "losses": losses,
        "penalties": penalties,
        "final": final,
        "grad_batch": {
            "rows": gidx,
            "lambda": 0.1,
            "loss": ce.item(),
            "penalty": pen.item(),
            "w1_row_sums": gw1.sum(dim=1).tolist(),
            "w1_first": gw1.flatten()[:16].tolist(),
            "b1": g_model[0].bias.grad.tolist(),
            "w2": g_model[2].weight.grad.flatten().tolist(),
            "b2": g_model[2].bias.grad.tolist(),
        },
    }


def metrics_case(y_true, y_pred):
    labels = list(range(10))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels)
    avg = {}
    for a in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=a)
        avg[a] = {"precision": ap, "recall": ar, "f1": af}
    return {
        "y_true": [int(v) for v in y_true],
        "y_pred": [int(v) for v in y_pred],
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "precision": p.tolist(),
        "recall": r.tolist(),
        "f1": f.tolist(),
        "support": s.tolist(),
        "accuracy": accuracy_score(y_true, y_pred),
        "macro": avg["macro"],
        "weighted": avg["weighted"],
        "report": classification_report(
            y_true, y_pred, labels=labels, target_names=CLASSES, digits=2
        ),
        "report_digits4": classification_report(
            y_true, y_pred, labels=labels, target_names=CLASSES, digits=4
        ),
    }


def metrics():
    rng = np.random.default_rng(7)
    # Case 1: 300 samples, class-dependent accuracy, class 7 ("horse") never predicted.
    y_true = rng.integers(0, 10, 300)
    hit = rng.random(300) < np.linspace(0.2, 0.95, 10)[y_true]
    y_pred = np.where(hit, y_true, rng.integers(0, 10, 300))
    y_pred = np.where(y_pred == 7, (y_true + 1) % 10, y_pred)
    # Case 2: 23 samples; class 4 absent from both arrays, class 9 only predicted.
    y_true2 = np.array([0, 0, 1, 1, 1, 2, 3, 3, 5, 5, 5, 5, 6, 7, 7, 8, 8, 8, 8, 2, 6, 0, 3])
    y_pred2 = np.array([0, 1, 1, 1, 9, 2, 3, 5, 5, 5, 3, 5, 6, 7, 9, 8, 8, 0, 8, 2, 6, 0, 3])
    return {
        "generator": "tools/gen_head_fixtures.py",
        "versions": versions(),
        "classes": CLASSES,
        "cases": [metrics_case(y_true, y_pred), metrics_case(y_true2, y_pred2)],
    }


def top_k():
    """Scores with ties (rounded to tenths), a row of all-equal scores, and softmax-like rows."""
    rng = np.random.default_rng(11)
    n = 60
    scores = np.round(rng.random((n, 10)), 1).astype(np.float32)
    scores[0, :] = 0.5
    scores[1:20] = np.exp(rng.normal(size=(19, 10))).astype(np.float32)
    scores[1:20] /= scores[1:20].sum(axis=1, keepdims=True)
    y = rng.integers(0, 10, n)
    return {
        "generator": "tools/gen_head_fixtures.py",
        "versions": versions(),
        "y_true": [int(v) for v in y],
        "scores": [[float(v) for v in row] for row in scores],
        "top_k": {
            str(k): top_k_accuracy_score(y, scores.astype(np.float64), k=k, labels=list(range(10)))
            for k in range(1, 11)
        },
    }


def eval_val():
    """40 validation rows of 16 features (tag 11, class bump 1.0), a 16-8-10 ReLU head
    (tags 13-16, scale 0.5), labels from tag 12. Float32 inputs and weights, float64 maths."""
    n, dim, hidden, classes = 40, 16, 8, 10
    y = np.array([h32(h32(12) ^ r) % classes for r in range(n)])
    x = np.array(
        [[uniform(11, r * dim + i) + (1.0 if i % classes == y[r] else 0.0) for i in range(dim)]
         for r in range(n)]
    ).astype(np.float32).astype(np.float64)
    w1 = np.array([uniform(13, k) * 0.5 for k in range(hidden * dim)]).reshape(hidden, dim)
    b1 = np.array([uniform(14, k) * 0.5 for k in range(hidden)])
    w2 = np.array([uniform(15, k) * 0.5 for k in range(classes * hidden)]).reshape(classes, hidden)
    b2 = np.array([uniform(16, k) * 0.5 for k in range(classes)])
    z2 = np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    z2 -= z2.max(axis=1, keepdims=True)
    p = np.exp(z2) / np.exp(z2).sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(n), y]).mean())
    pred = p.argmax(axis=1)
    ranked = np.sort(p, axis=1)
    # No near tie may decide a prediction or a top-5 hit, so float32 arithmetic agrees.
    assert (ranked[:, -1] - ranked[:, -2]).min() > 1e-4
    assert np.abs(ranked[:, -5:-4] - ranked[:, -6:-5]).min() > 1e-4
    labels = list(range(classes))
    pr, rc, f1, sup = precision_recall_fscore_support(y, pred, labels=labels)
    return {
        "generator": "tools/gen_head_fixtures.py",
        "versions": versions(),
        "n": n,
        "dims": {"input": dim, "hidden": hidden, "classes": classes},
        "y_true": [int(v) for v in y],
        "y_pred": [int(v) for v in pred],
        "loss": loss,
        "accuracy": accuracy_score(y, pred),
        "top5": top_k_accuracy_score(y, p, k=5, labels=labels),
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "precision": pr.tolist(),
        "recall": rc.tolist(),
        "f1": f1.tolist(),
        "support": sup.tolist(),
        "report": classification_report(y, pred, labels=labels, target_names=CLASSES, digits=2),
    }


def main():
    # The undefined metrics (0/0) are part of what the fixture checks: sklearn sets them to 0.
    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for name, data in (
        ("sgd_trajectory.json", trajectory()),
        ("sgd_trajectory_linear.json", trajectory("none", lam=0.0, seed=20260101)),
        ("metrics.json", metrics()),
        ("top_k.json", top_k()),
        ("eval_val.json", eval_val()),
    ):
        path = os.path.join(OUT, name)
        with open(path, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
