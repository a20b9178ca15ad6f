"""Allocation speed at OpenVLA-OFT-7B scale: the channels of the `oft-7b` decoder's Linears
(32 layers x q,k,v,o,gate,up,down = 1.36 M channels, 6.5 G weights) with a synthetic sensitivity
table shaped like a measured one (per-channel scale x per-width error, noise).

    .venv/bin/python bench/quant/allocate_scale.py [--out bench/quant/allocate_scale.json]

Records seconds per budget and the duality gap; no model weights are needed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qvla_ros.quant.allocate import allocate  # noqa: E402
from qvla_ros.quant.sensitivity import SensitivityTable  # noqa: E402

BITS = (0, 2, 3, 4, 8, 16)
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def synthetic_7b(seed: int = 0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    costs, ins = {}, {}
    for layer in range(32):
        for name, (n, k) in SHAPES.items():
            s = rng.lognormal(0, 1.5, size=(n, 1)) * (1 + layer / 8)
            c = s * np.array([0.0, 4.0 ** -2, 4.0 ** -3, 4.0 ** -4, 4.0 ** -8, 0.0]) * rng.lognormal(0, 0.2, size=(n, 6))
            c[:, 0] = s[:, 0] * rng.lognormal(0, 1, size=n)
            costs[f"decoder.layers.{layer}.{name}"], ins[f"decoder.layers.{layer}.{name}"] = c, k
    return SensitivityTable(BITS, costs, ins, {"estimator": "synthetic"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "quant" / "allocate_scale.json"))
    args = ap.parse_args()
    table = synthetic_7b()
    rows = []
    for budget in (2.5, 3.0, 4.0, 6.0):
        a = allocate(table, budget)
        rows.append({"budget": budget, "bits_per_param": a.bits_per_param, "seconds": round(a.seconds, 2),
                     "relative_gap": a.relative_gap})
        print(rows[-1])
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    result = {"cpu": cpu, "channels": int(sum(c.shape[0] for c in table.costs.values())),
              "weights": int(sum(c.shape[0] * table.in_features[n] for n, c in table.costs.items())),
              "layers": len(table.costs), "rows": rows,
              "note": "wall seconds on a shared 2-core machine (other jobs running)"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
