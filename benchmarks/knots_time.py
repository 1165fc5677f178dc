"""KnOTS per-tensor cost (issue 24: SVD-based methods report their time per tensor): one 5504 x 2048 weight
(kernel_micro's shape, Llama-like) LoRA'd by 4 adapters of rank 16, merged by knots_ta / knots_ties / knots_dare
from the factors, against TIES on the same 4 updates folded into dense tensors (what `basin merge` with `ties` reads).
CPU seconds of this process (less sensitive to other processes than wall time) and wall seconds, best of
--repeats. Writes benchmarks/results/knots_time.json with the machine block.

    python benchmarks/knots_time.py [--repeats 3] [--rank 16] [--models 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"knots_ta": {}, "knots_ties": {"density": 0.2}, "knots_dare": {"density": 0.9},
          "ties": {"density": 0.2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/knots_time.json")
    args = parser.parse_args()
    from merging import profiling
    from merging.io.lora import LoraTensor
    from merging.methods.apply import full_params, merge_tensor
    from merging.methods.catalog import get_method

    out_dim, in_dim = 5504, 2048
    g = torch.Generator().manual_seed(0)
    base = torch.randn(out_dim, in_dim, generator=g) * 0.02
    inputs = [LoraTensor(None, torch.randn(out_dim, args.rank, generator=g) * 0.01,
                         torch.randn(args.rank, in_dim, generator=g) * 0.01) for _ in range(args.models)]
    rows = []
    for method in ("knots_ta", "knots_ties", "knots_dare"):
        m = get_method(method)
        params = full_params(m, PARAMS[method], args.models)
        row = {"method": method, "inputs": "factors",
               **best_of(lambda m=m, params=params: merge_tensor(m, "w", inputs, base, params, 0), args.repeats)}
        rows.append(row)
        print(json.dumps(row))
    dense = [x.dense(base) for x in inputs]
    ties = get_method("ties")
    params = full_params(ties, PARAMS["ties"], args.models)
    row = {"method": "ties", "inputs": "dense (base + s B A)",
           **best_of(lambda: merge_tensor(ties, "w", dense, base, params, 0), args.repeats)}
    rows.append(row)
    print(json.dumps(row))
    args.out.write_text(json.dumps({"benchmark": "knots_time", "shape": [out_dim, in_dim], "models": args.models,
                                    "rank": args.rank, "torch_threads": torch.get_num_threads(),
                                    "machine": profiling.machine(), "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
