#!/usr/bin/env python3
"""Two small torch.save files that a state dict can come as but candle cannot read as is
(run by hand; CI has no Python):

    python3 tools/gen_weight_edge_fixtures.py

- tests/fixtures/backbone/noncontiguous.pth: `conv1.weight` is a strided view (every other
  column of a larger tensor), which torch.save stores with its strides;
- tests/fixtures/backbone/int32.pth: `conv1.weight` stored as int32 (candle reads no int32
  storage), beside a float `fc.bias`.

The file manifest_edge.json records the library versions.
"""

import json
import os

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "backbone")


def main() -> None:
    base = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6) / 7.0
    torch.save({"conv1.weight": base[:, ::2], "fc.bias": torch.ones(3)},
               os.path.join(OUT, "noncontiguous.pth"))
    torch.save({"conv1.weight": torch.arange(6, dtype=torch.int32).reshape(2, 3),
                "fc.bias": torch.ones(3)},
               os.path.join(OUT, "int32.pth"))
    with open(os.path.join(OUT, "manifest_edge.json"), "w") as f:
        json.dump({"files": ["noncontiguous.pth", "int32.pth"],
                   "versions": {"torch": torch.__version__}}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
