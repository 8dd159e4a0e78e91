#!/usr/bin/env python3
"""The hand values of tests/backprop.rs, recomputed in plain Python floats (run by hand).

    python3 tools/backprop_hand_values.py      # prints the values the test pins

The network is tests/fixtures/backprop/params_3441.json (3 inputs, two hidden layers of 4
logistic units, one identity output, E = ½ (y − t)²). Each quantity is computed unit by unit
from the formulas of the assignment, independently of the Rust code and of numpy:

    δ^(4)_1 = y − t
    δ^(3)_k = h'(a^(3)_k) w^(3)_{1k} δ^(4)_1
    δ^(2)_j = h'(a^(2)_j) Σ_k w^(2)_{kj} δ^(3)_k,      h'(a) = e^(−a) / (1 + e^(−a))²
"""

import json
import math
import os

PARAMS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "backprop",
                      "params_3441.json")


def main():
    with open(PARAMS) as f:
        p = json.load(f)
    w1, w2, w3 = p["weights"]
    x, t = p["x"], p["t"]

    def sigma(a):
        return 1.0 / (1.0 + math.exp(-a))

    def h_prime(a):
        return math.exp(-a) / ((1.0 + math.exp(-a)) * (1.0 + math.exp(-a)))

    a2 = [w1[j][0] * x[0] + w1[j][1] * x[1] + w1[j][2] * x[2] for j in range(4)]
    z2 = [sigma(a) for a in a2]
    a3 = [w2[k][0] * z2[0] + w2[k][1] * z2[1] + w2[k][2] * z2[2] + w2[k][3] * z2[3]
          for k in range(4)]
    z3 = [sigma(a) for a in a3]
    y = w3[0][0] * z3[0] + w3[0][1] * z3[1] + w3[0][2] * z3[2] + w3[0][3] * z3[3]
    d4 = y - t
    d3 = [h_prime(a3[k]) * w3[0][k] * d4 for k in range(4)]
    d2 = [h_prime(a2[j]) * (w2[0][j] * d3[0] + w2[1][j] * d3[1] + w2[2][j] * d3[2]
                            + w2[3][j] * d3[3]) for j in range(4)]
    loss = 0.5 * (y - t) ** 2
    print(f"E       = {loss!r}")
    print(f"δ^(4)   = {d4!r}")
    print(f"δ^(3)   = [{', '.join(repr(v) for v in d3)}]")
    print(f"δ^(2)   = [{', '.join(repr(v) for v in d2)}]")


if __name__ == "__main__":
    main()
