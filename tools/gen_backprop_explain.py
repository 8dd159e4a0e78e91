#!/usr/bin/env python3
"""Expected text of `cifar-finetune backprop --explain` (run by hand; CI has no Python).

    python3 tools/gen_backprop_explain.py     # writes tests/fixtures/backprop/explain_3441.txt

Reads tests/fixtures/backprop/params_3441.json (the assignment's 3-4-4-1 network, no biases)
and computes every number of the explanation independently of the Rust code, with numpy in
float64: the forward pass, the δs and derivatives written out term by term as the assignment
derives them (not by a general δ-rule loop), and each derivative's finite difference by
perturbing the quantity and re-running the forward pass. The text around the numbers mirrors
src/backprop.rs (`Problem::explain`); tests/backprop_explain.rs requires the words to be equal
and the numbers to agree to 1e-7 relative.
"""

import json
import math
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")
PARAMS = os.path.join(ROOT, "tests", "fixtures", "backprop", "params_3441.json")
OUT = os.path.join(ROOT, "tests", "fixtures", "backprop", "explain_3441.txt")
# What the test passes as the source description (the path as given on the command line).
SOURCE = "parameters from tests/fixtures/backprop/params_3441.json"
REL_ERROR_FLOOR = 1e-4


def h(a):
    return 1.0 / (1.0 + np.exp(-a))


def forward(w1, w2, w3, x, t, a2=None, a3=None, a4=None):
    """Returns (a2, z2, a3, z3, a4, E); a given a^(l) replaces the computed one."""
    if a2 is None:
        a2 = np.array([sum(w1[j, k] * x[k] for k in range(3)) for j in range(4)])
    z2 = h(a2)
    if a3 is None:
        a3 = np.array([sum(w2[j, k] * z2[k] for k in range(4)) for j in range(4)])
    z3 = h(a3)
    if a4 is None:
        a4 = sum(w3[0, k] * z3[k] for k in range(4))
    return a2, z2, a3, z3, a4, 0.5 * (a4 - t) ** 2


def richardson(theta, f):
    """The fourth-order central difference of f at theta (steps ε and 2ε)."""
    step = np.finfo(float).eps ** 0.2 * max(1.0, abs(theta))
    hh = (theta + step) - theta
    return (f(theta - 2 * hh) - 8 * f(theta - hh) + 8 * f(theta + hh) - f(theta + 2 * hh)) / (12 * hh)


def num(x):
    """Mirrors explain_num in src/backprop.rs."""
    x = float(x)
    if x == 0.0:
        body = "0"
    elif 1e-4 <= abs(x) < 1e6:
        before = math.floor(math.log10(abs(x))) + 1
        decimals = max(10 - before, 0)
        s = f"{x:.{decimals}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        body = "0" if s == "-0" else s
    else:
        m, e = f"{x:.9e}".split("e")
        if "." in m:
            m = m.rstrip("0").rstrip(".")
        body = f"{m}e{int(e)}"
    return f"({body})" if x < 0 and body != "0" else body


def check_line(analytic, numeric, loss):
    floor = REL_ERROR_FLOOR * max(1.0, abs(loss))
    rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric), floor)
    rel_s = "below 1e-8" if rel < 1e-8 else f"{rel:.1e}"
    return f"   finite difference: {num(numeric)} (relative error {rel_s})"


def main():
    with open(PARAMS) as f:
        p = json.load(f)
    w1, w2, w3 = (np.array(w, dtype=np.float64) for w in p["weights"])
    x = np.array(p["x"], dtype=np.float64)
    t = float(p["t"][0] if isinstance(p["t"], list) else p["t"])
    a2, z2, a3, z3, a4, E = forward(w1, w2, w3, x, t)

    # The assignment's quantities, term by term.
    d4 = a4 - t
    dw3_12 = d4 * z3[1]
    hp3 = z3 * (1 - z3)
    d3 = np.array([d4 * w3[0, k] * hp3[k] for k in range(4)])
    dw2_11 = d3[0] * z2[0]
    hp2_1 = z2[0] * (1 - z2[0])
    d2_1 = (d3[0] * w2[0, 0] + d3[1] * w2[1, 0] + d3[2] * w2[2, 0] + d3[3] * w2[3, 0]) * hp2_1
    dw1_11 = d2_1 * x[0]

    # Finite differences: perturb the quantity, run the rest of the forward pass.
    def with_w(which, j, k):
        def f(v):
            ws = [w1.copy(), w2.copy(), w3.copy()]
            ws[which][j, k] = v
            return forward(*ws, x, t)[5]
        return f

    def with_a(layer, j):
        def f(v):
            if layer == 4:
                return forward(w1, w2, w3, x, t, a4=v)[5]
            if layer == 3:
                a = a3.copy()
                a[j] = v
                return forward(w1, w2, w3, x, t, a3=a)[5]
            a = a2.copy()
            a[j] = v
            return forward(w1, w2, w3, x, t, a2=a)[5]
        return f

    fd_d4 = richardson(a4, with_a(4, 0))
    fd_w3_12 = richardson(w3[0, 1], with_w(2, 0, 1))
    fd_d3_1 = richardson(a3[0], with_a(3, 0))
    fd_w2_11 = richardson(w2[0, 0], with_w(1, 0, 0))
    fd_d2_1 = richardson(a2[0], with_a(2, 0))
    fd_w1_11 = richardson(w1[0, 0], with_w(0, 0, 0))

    n = num
    L = []
    L.append(f"Error propagation in the assignment's 3-4-4-1 network, step by step ({SOURCE})")
    L.append("")
    L.append("Notation (the assignment's): x_1, x_2, x_3 are the inputs; a^(l)_j is the activation of unit j")
    L.append("of layer l and z^(l)_j = h(a^(l)_j) its output; w^(l)_{jk} is the weight from unit k of layer l")
    L.append("to unit j of layer l+1; h(a) = 1/(1 + e^(-a)) in the hidden layers 2 and 3, the identity at the")
    L.append("output, so y = a^(4)_1; E = 1/2 (y - t)^2; δ^(l)_j = ∂E/∂a^(l)_j.")
    L.append("Corrected from the seed's report: a^(2)_1 has three input terms, not a fourth w^(1)_{14} x_4 "
             "(there are three inputs), and δ^(4)_1 = (2/2)(a^(4)_1 - t) needs its parentheses.")
    L.append("")
    L.append("Forward pass")
    L.append(f"   x = ({n(x[0])}, {n(x[1])}, {n(x[2])}), t = {n(t)}")
    L.append("   a^(2)_j = w^(1)_{j1} x_1 + w^(1)_{j2} x_2 + w^(1)_{j3} x_3,   z^(2)_j = h(a^(2)_j)")
    for j in range(4):
        L.append(f"   a^(2)_{j + 1} = {n(w1[j, 0])} × {n(x[0])} + {n(w1[j, 1])} × {n(x[1])} + "
                 f"{n(w1[j, 2])} × {n(x[2])} = {n(a2[j])},   z^(2)_{j + 1} = {n(z2[j])}")
    L.append("   a^(3)_j = w^(2)_{j1} z^(2)_1 + w^(2)_{j2} z^(2)_2 + w^(2)_{j3} z^(2)_3 + "
             "w^(2)_{j4} z^(2)_4,   z^(3)_j = h(a^(3)_j)")
    for j in range(4):
        L.append(f"   a^(3)_{j + 1} = {n(a3[j])},   z^(3)_{j + 1} = {n(z3[j])}")
    L.append("   y = a^(4)_1 = w^(3)_{11} z^(3)_1 + w^(3)_{12} z^(3)_2 + w^(3)_{13} z^(3)_3 + "
             f"w^(3)_{{14}} z^(3)_4 = {n(a4)}")
    L.append(f"   E = 1/2 (y - t)^2 = 1/2 ({n(a4)} - {n(t)})^2 = {n(E)}")
    L.append("")

    L.append("1. δ^(4)_1 = ∂E/∂a^(4)_1")
    L.append("   E = 1/2 (a^(4)_1 - t)^2 because y = a^(4)_1 (identity output), so")
    L.append("   δ^(4)_1 = (2/2)(a^(4)_1 - t) = a^(4)_1 - t")
    L.append(f"           = {n(a4)} - {n(t)} = {n(d4)}")
    L.append(check_line(d4, fd_d4, E))
    L.append("")

    L.append("2. ∂E/∂w^(3)_{12}")
    L.append("   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂w^(3)_{12} = δ^(4)_1 z^(3)_2   (of the four terms of "
             "a^(4)_1 only w^(3)_{12} z^(3)_2 holds w^(3)_{12})")
    L.append(f"   = {n(d4)} × {n(z3[1])} = {n(dw3_12)}")
    L.append(check_line(dw3_12, fd_w3_12, E))
    L.append("")

    L.append("3. δ^(3)_1 = ∂E/∂a^(3)_1")
    L.append("   = ∂E/∂a^(4)_1 · ∂a^(4)_1/∂z^(3)_1 · ∂z^(3)_1/∂a^(3)_1 = δ^(4)_1 w^(3)_{11} h'(a^(3)_1)")
    L.append("   h'(a) = e^(-a)/(1 + e^(-a))^2 = h(a)(1 - h(a)), so h'(a^(3)_1) = z^(3)_1 (1 - z^(3)_1) = "
             f"{n(z3[0])} × (1 - {n(z3[0])}) = {n(hp3[0])}")
    L.append(f"   = {n(d4)} × {n(w3[0, 0])} × {n(hp3[0])} = {n(d3[0])}")
    L.append(check_line(d3[0], fd_d3_1, E))
    L.append("")

    L.append("4. ∂E/∂w^(2)_{11}")
    L.append("   = ∂E/∂a^(3)_1 · ∂a^(3)_1/∂w^(2)_{11} = δ^(3)_1 z^(2)_1   (a^(3)_1 = w^(2)_{11} z^(2)_1 + "
             "w^(2)_{12} z^(2)_2 + w^(2)_{13} z^(2)_3 + w^(2)_{14} z^(2)_4)")
    L.append(f"   = {n(d3[0])} × {n(z2[0])} = {n(dw2_11)}")
    L.append(check_line(dw2_11, fd_w2_11, E))
    L.append("")

    L.append("5. δ^(2)_1 = ∂E/∂a^(2)_1")
    L.append("   a^(2)_1 reaches E through z^(2)_1 and every a^(3)_k (k = 1, ..., 4), so the chain rule "
             "sums over k:")
    L.append("   = Σ_k ∂E/∂a^(3)_k · ∂a^(3)_k/∂a^(2)_1 = [δ^(3)_1 w^(2)_{11} + δ^(3)_2 w^(2)_{21} + "
             "δ^(3)_3 w^(2)_{31} + δ^(3)_4 w^(2)_{41}] h'(a^(2)_1)")
    L.append("   with δ^(3)_k = δ^(4)_1 w^(3)_{1k} h'(a^(3)_k) = δ^(4)_1 w^(3)_{1k} z^(3)_k (1 - z^(3)_k):")
    for k in range(4):
        L.append(f"     δ^(3)_{k + 1} = {n(d4)} × {n(w3[0, k])} × {n(hp3[k])} = {n(d3[k])}")
    L.append(f"   and h'(a^(2)_1) = z^(2)_1 (1 - z^(2)_1) = {n(z2[0])} × (1 - {n(z2[0])}) = {n(hp2_1)}")
    L.append(f"   = [{n(d3[0])} × {n(w2[0, 0])} + {n(d3[1])} × {n(w2[1, 0])} + {n(d3[2])} × "
             f"{n(w2[2, 0])} + {n(d3[3])} × {n(w2[3, 0])}] × {n(hp2_1)} = {n(d2_1)}")
    L.append(check_line(d2_1, fd_d2_1, E))
    L.append("")

    L.append("6. ∂E/∂w^(1)_{11}")
    L.append("   = ∂E/∂a^(2)_1 · ∂a^(2)_1/∂w^(1)_{11} = δ^(2)_1 x_1   (a^(2)_1 = w^(1)_{11} x_1 + "
             "w^(1)_{12} x_2 + w^(1)_{13} x_3)")
    L.append(f"   = {n(d2_1)} × {n(x[0])} = {n(dw1_11)}")
    L.append(check_line(dw1_11, fd_w1_11, E))

    text = "\n".join(L) + "\n"
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(OUT)} ({len(text.encode())} bytes), numpy {np.__version__}")


if __name__ == "__main__":
    main()
