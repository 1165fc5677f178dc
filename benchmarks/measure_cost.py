"""What `basin merge --measure` adds to a 4-model merge of ~100M-parameter Llamas, against its forward passes.

Issue 20's benchmark: "the `--measure` report on a 4-model merge adds at most the cost of its forward passes".
Four seeded random Llama-shaped checkpoints (`checkpoint_path.build`: ~106M parameters, float32 on disk) with one
word-level tokenizer, a seeded random text of those words, a linear merge of the four. Three fresh processes, each
timed whole by `benchmarks/_peer.timed` (wall, CPU = user + sys, peak RSS):

- plain: `basin merge recipe out/`;
- measured: `basin merge recipe out/ --measure calib.txt` (points, seq-len and examples below);
- floor: `load_model(out)` and `load_data` as the report's, then N forward passes (`measure_loss`), N = the
  passes the report needs: one per distinct model it measures (every input and the merge), plus the interior
  points of its paths and barriers (a path's end points are those models: their losses are reused), read from
  its measure.json; timed inside the process around the passes only. `forwards_every_point` counts what the
  report made before it reused the end points (every loss and every point of every path and barrier).

extra = measured - plain; target: extra <= floor (the report adds nothing but the forward passes it needs). The
machine is shared: the load average is recorded; CPU-time figures are less sensitive to load than wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/measure_cost.py [--layers 9] [--points 3] [--examples 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "measure_cost.json"
VOCAB = 32000


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _text(path: Path, words: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(64))
                              for _ in range(words // 64)) + "\n")


def _series(report: dict) -> list[list[float]]:
    paths = [p["alphas"] for p in report.get("paths") or []]
    return paths + [b["path"]["alphas"] for b in report.get("barriers") or []]


def forwards_every_point(report: dict) -> int:
    """The forward passes of a report that evaluates every loss and every point of every path on its own."""
    return len(report.get("losses") or {}) + sum(len(a) for a in _series(report))


def forwards(report: dict) -> int:
    """The forward passes the report needs: one per distinct model (the inputs and the merge: every path ends at
    two of them) and one per interior point of its paths and barriers."""
    return len(report["models"]) + sum(sum(1 for x in a if x not in (0.0, 1.0)) for a in _series(report))


def floor(out: str, data: str, n: int, seq_len: int, examples: int) -> dict:
    """n forward passes over the report's data at the merged model, in this (fresh) process."""
    import torch

    from evaluations.measure import measure_loss
    from evaluations.models import load_model
    from evaluations.text_data import load_data

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model(out)
    batches = load_data(model, data, seq_len=seq_len, max_examples=examples, batch_size=8, seed=0)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        measure_loss(model, batches)
    return {"forwards": n, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--floor", nargs=3, metavar=("OUT", "DATA", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.floor:
        print(json.dumps(floor(args.floor[0], args.floor[1], int(args.floor[2]), args.seq_len, args.examples)))
        return
    from checkpoint_path import build, cpu_model

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    basin = [sys.executable, "-m", "evaluations.cli", "merge"]
    with tempfile.TemporaryDirectory(prefix="basin-measure-") as tmp:
        root = Path(tmp)
        folders = [root / f"m{k}" for k in range(4)]
        params = [build(f, k, args.layers) for k, f in enumerate(folders)][0]
        for f in folders:
            _tokenizer(f)
        data = root / "calib.txt"
        _text(data, 64 * (args.seq_len * args.examples // 64 + 64))
        models = "".join(f"  - model: {f}\n    parameters: {{weight: 0.25}}\n" for f in folders)
        (root / "recipe.yml").write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}")
        plain = timed([*basin, str(root / "recipe.yml"), str(root / "plain"), "--no-progress"], env)
        measured = timed([*basin, str(root / "recipe.yml"), str(root / "measured"), "--no-progress", "--measure",
                          str(data), "--measure-points", str(args.points), "--measure-seq-len", str(args.seq_len),
                          "--measure-max-examples", str(args.examples)], env)
        report = json.loads((root / "measured" / "measure.json").read_text())
        n = forwards(report)
        out = timed([sys.executable, __file__, "--floor", str(root / "measured"), str(data), str(n), "--seq-len",
                     str(args.seq_len), "--examples", str(args.examples)], env, stdout=True)
    fwd = json.loads(out.pop("stdout").strip().splitlines()[-1])
    extra = measured["seconds"] - plain["seconds"]
    extra_cpu = measured["cpu_seconds"] - plain["cpu_seconds"]
    result = {"benchmark": "measure_cost", "parameters_per_model": params, "models": 4, "layers": args.layers,
              "points": args.points, "tokens": args.seq_len * args.examples, "forwards": n,
              "forwards_every_point": forwards_every_point(report),
              "forwards_note": "forwards: the passes the report needs and makes (one per distinct model, the "
                               "inputs and the merge, plus each interior point of its paths and barriers; a path's "
                               "end points reuse those models' losses); forwards_every_point: what it made before "
                               "(every loss, and every point of every path and barrier, on its own); the floor "
                               "times `forwards` passes",
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                          "note": "shared machine: the load average (1, 5, 15 min) at the end says how loaded; "
                                  "the floor runs in its own process, so wall ratios mix loads, CPU less so"},
              "plain_merge": plain, "measured_merge": measured, "floor": {**fwd, "process": out},
              "extra_s": extra, "extra_cpu_s": extra_cpu,
              "extra_over_forwards": extra / fwd["seconds"], "extra_cpu_over_forwards": extra_cpu / fwd["cpu_seconds"],
              "target": "extra_over_forwards <= 1"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("forwards", "forwards_every_point", "extra_s", "extra_over_forwards",
                                             "extra_cpu_over_forwards")}))


if __name__ == "__main__":
    main()
