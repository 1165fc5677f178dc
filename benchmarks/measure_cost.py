"""What `basin merge --measure` adds to a 4-model merge of ~100M-parameter Llamas, against its forward passes.

Issue 20's benchmark: "the `--measure` report on a 4-model merge adds at most the cost of its forward passes".
Four seeded random Llama-shaped checkpoints (`checkpoint_path.build`: ~106M parameters, float32 on disk) with one
word-level tokenizer, a seeded random text of those words, a linear merge of the four; torch on `--threads`
threads (default 1). Two fresh processes, each running `evaluations.cli.main` in-process (timed from before its
import: wall, and CPU = user + sys of every thread):

- plain: `basin merge recipe out/`;
- measured: `basin merge recipe out/ --measure calib.txt` (points, seq-len and examples below), each phase of it
  timed by wrapping the functions it calls (`PHASES`: prepare, merge, statistics, forwards, point writes, weight
  copies, the output's data check, report writing, the plot on its thread); then, in the same process, the floor:
  the merged model loaded (`load_model(out)`) and the report's data (`load_data`, the report's settings), both
  before the clock starts, and N forward passes by hand (`measure_loss`), N = the passes the report needs: one per
  distinct model it measures (every input and the merge), plus the interior points of its paths and barriers (a
  path's end points are those models: their losses are reused), read from its measure.json. The floor's loss
  must equal the merge's loss in measure.json (the same forwards). `forwards_every_point` counts what the report
  made before it reused the end points (every loss and every point of every path and barrier).

added = measured - plain (in-process `main()`, wall and CPU); target: added / floor <= 1 (the report adds nothing
but the forward passes it needs). `phases` says where the rest goes. The machine is shared: the load average is
recorded; CPU-time figures are less sensitive to load than wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/measure_cost.py [--layers 9] [--points 3] [--examples 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import importlib
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
# (phase, module, attribute) timed in the measured process; indented phases run inside the one above them
PHASES = [
    ("prepare", "evaluations.merge_report", "prepare"),
    ("merge", "merging.pipeline", "merge"),
    ("  statistics", "merging.merge_stats", "MergeStats.observe"),
    ("measure", "evaluations.merge_report", "measure"),
    ("  forwards: model losses", "evaluations.measure", "measure_loss"),
    ("  forwards: path points", "evaluations.lm_path", "measure"),
    ("  point writes", "evaluations.lm_path", "write_point"),
    ("  weight copies", "evaluations.models", "copy_weights"),
    ("  output data check", "evaluations.merge_report", "_output_data"),
    ("write report", "evaluations.merge_report", "write_report"),
    ("plot (on its thread)", "evaluations.merge_report", "render_paths"),
]


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


class Phases:
    """Wall and CPU seconds (every thread: `time.process_time`) and calls of each wrapped function in `PHASES`."""

    def __init__(self) -> None:
        self.totals = {label: {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0} for label, _, _ in PHASES}
        self.saved: list[tuple[object, str, object]] = []

    def install(self, only: tuple[str, ...] | None = None) -> None:
        """Wrap the functions of `PHASES` (of the phases `only`, when given)."""
        for label, module, attribute in PHASES:
            if only is not None and label not in only:
                continue
            owner = importlib.import_module(module)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            self.saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self._wrap(label, getattr(owner, name)))

    def uninstall(self) -> None:
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)
        self.saved = []

    def _wrap(self, label: str, fn):
        row = self.totals[label]

        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                row["seconds"] += time.perf_counter() - wall
                row["cpu_seconds"] += time.process_time() - cpu
                row["calls"] += 1
        return timed_call

    def to_json(self, total: dict) -> dict:
        """The phases, rounded, with what is left outside them (`other`: imports, the CLI, recipe loading)."""
        out = {label.strip(): {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
               for label, row in self.totals.items()}
        top = [label for label, _, _ in PHASES if not label.startswith(" ") and "thread" not in label]
        out["other"] = {k: round(total[k] - sum(self.totals[t][k] for t in top), 3)
                        for k in ("seconds", "cpu_seconds")}
        return out


def _merge_args(root: Path, out: str, measure: bool, args) -> list[str]:
    argv = ["merge", str(root / "recipe.yml"), out, "--no-progress"]
    if measure:
        argv += ["--measure", str(root / "calib.txt"), "--measure-points", str(args.points), "--measure-seq-len",
                 str(args.seq_len), "--measure-max-examples", str(args.examples)]
    return argv


def child(mode: str, root: Path, args) -> dict:
    """One run in this (fresh) process: the plain or the measured merge, in-process; the floor after a measured one."""
    wall, cpu = time.perf_counter(), time.process_time()
    import torch

    torch.set_num_threads(args.threads)
    phases = Phases()
    phases.install(None if mode == "measured" else ("merge",))  # the plain merge's own, nothing more imported
    from evaluations.cli import main

    out = str(root / mode)
    if main(_merge_args(root, out, mode == "measured", args)) != 0:
        raise SystemExit(f"basin merge ({mode}) failed")
    total = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
    result = {k: round(v, 3) for k, v in total.items()}
    phases.uninstall()
    result["phases"] = phases.to_json(total)
    if mode == "measured":
        result["floor"] = floor(out, str(root / "calib.txt"), json.loads((Path(out) / "measure.json").read_text()),
                                args)
    return result


def floor(out: str, data: str, report: dict, args) -> dict:
    """The report's forward passes by hand at the merged model, in this process: model and data made first."""
    from evaluations.measure import measure_loss
    from evaluations.models import load_model
    from evaluations.text_data import load_data

    spec = report["spec"]
    model = load_model(out)
    batches = load_data(model, data, seq_len=spec["seq_len"], max_examples=spec["max_examples"],
                        batch_size=spec["batch_size"], seed=spec["seed"])
    n = forwards(report)
    wall, cpu = time.perf_counter(), time.process_time()
    losses = [measure_loss(model, batches).loss for _ in range(n)]
    result = {"forwards": n, "seconds": round(time.perf_counter() - wall, 3),
              "cpu_seconds": round(time.process_time() - cpu, 3)}
    if set(losses) != {report["losses"]["merge"]["loss"]}:
        raise SystemExit(f"floor: the merge's loss by hand {losses[0]!r} is not measure.json's "
                         f"{report['losses']['merge']['loss']!r}")
    return result


def _fixture(root: Path, args) -> int:
    from checkpoint_path import build

    folders = [root / f"m{k}" for k in range(4)]
    params = [build(f, k, args.layers) for k, f in enumerate(folders)][0]
    for f in folders:
        _tokenizer(f)
    _text(root / "calib.txt", 64 * (args.seq_len * args.examples // 64 + 64))
    models = "".join(f"  - model: {f}\n    parameters: {{weight: 0.25}}\n" for f in folders)
    (root / "recipe.yml").write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}")
    return params


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args)))
        return
    from checkpoint_path import cpu_model

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(args.threads))
    settings = ["--layers", str(args.layers), "--points", str(args.points), "--seq-len", str(args.seq_len),
                "--examples", str(args.examples), "--threads", str(args.threads)]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="basin-measure-") as tmp:
        root = Path(tmp)
        params = _fixture(root, args)
        for mode in ("plain", "measured"):
            process = timed([sys.executable, __file__, *settings, "--child", mode, str(root)], env, stdout=True)
            runs[mode] = {**json.loads(process.pop("stdout").strip().splitlines()[-1]), "process": process}
        report = json.loads((root / "measured" / "measure.json").read_text())
    plain, measured = runs["plain"], runs["measured"]
    fwd = measured.pop("floor")
    added = {k: round(measured[k] - plain[k], 3) for k in ("seconds", "cpu_seconds")}
    ph, pp = measured["phases"], plain["phases"]
    plain["phases"] = {k: pp[k] for k in ("merge", "other")}
    in_report = {k: round(ph["forwards: model losses"][k] + ph["forwards: path points"][k], 3)
                 for k in ("seconds", "cpu_seconds")}
    # what --measure adds, phase by phase (the merge's and the rest's share: measured minus plain)
    added_by_phase = {name: {k: round(ph[name][k] - (pp[name][k] if name in ("merge", "other") else 0), 3)
                             for k in ("seconds", "cpu_seconds")}
                      for name in ("prepare", "merge", "measure", "write report", "other")}
    added_by_phase["measure"] = {k: {"forwards": in_report[k], **{
        name: ph[name][k] for name in ("point writes", "weight copies", "output data check")},
        "rest": round(ph["measure"][k] - in_report[k] - sum(ph[name][k] for name in (
            "point writes", "weight copies", "output data check")), 3)} for k in ("seconds", "cpu_seconds")}
    result = {"benchmark": "measure_cost", "parameters_per_model": params, "models": 4, "layers": args.layers,
              "points": args.points, "tokens": args.seq_len * args.examples, "threads": args.threads,
              "forwards": fwd["forwards"], "forwards_every_point": forwards_every_point(report),
              "forwards_note": "forwards: the passes the report needs and makes (one per distinct model, the "
                               "inputs and the merge, plus each interior point of its paths and barriers; a path's "
                               "end points reuse those models' losses); forwards_every_point: what it made before "
                               "(every loss, and every point of every path and barrier, on its own); the floor "
                               "times `forwards` passes by hand in the measured process, after the report",
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                          "note": "shared machine: the load average (1, 5, 15 min) at the end says how loaded"},
              "plain_merge": plain, "measured_merge": measured, "floor": fwd, "added": added,
              "forwards_in_report": in_report, "added_by_phase": added_by_phase,
              "added_by_phase_note": "prepare: transformers' import, config, model build, input checks, "
                                     "tokenising; merge and other: measured minus plain (merge: the data-free "
                                     "statistics and their hook; other: imports and CLI); measure: its forward "
                                     "passes, point writes, weight copies, the output's tokenizer check, the rest; "
                                     "write report: measure.json, the card, waiting for the plot; the plot is "
                                     "drawn on a thread during the barriers (`phases`: its wall seconds overlap "
                                     "them, and its CPU seconds, every thread's, are in theirs too)",
              "added_beyond_forwards": {k: round(added[k] - fwd[k], 3) for k in ("seconds", "cpu_seconds")},
              "added_over_forwards": _ratio(added["seconds"], fwd["seconds"]),
              "added_cpu_over_forwards": _ratio(added["cpu_seconds"], fwd["cpu_seconds"]),
              "target": "added_over_forwards <= 1 (added: measured - plain merge, in-process main(); forwards: "
                        "the floor, the report's passes by hand in the measured process)"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("forwards", "added", "floor", "added_over_forwards",
                                             "added_cpu_over_forwards")}))


if __name__ == "__main__":
    main()
