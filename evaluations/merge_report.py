"""The merge report of `basin merge --measure DATA`: losses, paths, barriers and curvature, after the merge.

`prepare` runs BEFORE the merge, so a measurement that cannot run costs nothing: it opens every input (the
reference parser the merge uses: folders, files, Hub ids, `base+lora`), requires a config.json, builds the one
model the report uses (the config source's class, weights uninitialised), checks every input's tensors against it
and tokenises DATA. `measure` runs after the output is written; the model's weights are rewritten per point from
memory-mapped checkpoints (never all inputs in memory):

- loss: the objective's loss (`evaluations.model_losses.objective_for`; causal LMs: next-token cross-entropy,
  perplexity, next-token accuracy) of every input and of the merge;
- paths: the loss on the straight line from each input (the base included) to the merge, `points` alphas;
- barriers: the loss barrier (chord form, `evaluations.landscape.barrier`) on the line between each pair of inputs;
- hessian: the top Hessian eigenvalue of the loss (Lanczos, `evaluations.probes.lanczos`, on the parameters
  `params` selects) at each input and at the merge.

`MeasureReport.to_json` is `out/measure.json` (no times or paths that vary: the same recipe and seed give the same
bytes); `card_section` the model card's "Measurements" section; the loss along the paths is `measure_paths.png`,
drawn on a thread (`_Figure`) while the barriers' forward passes run.
Each distinct model is measured once (`_Points`): a path's end points are the losses of the models at its ends, so
4 inputs and a merge at 3 points per path take 15 forward passes, not 35. The private `_load_data`, `_loss` and
`_Points` are the only places that name the data, loss and path API.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from taxonomy.errors import BasinError, CheckpointError, DataError

DEFAULT_PROBES = ("loss", "paths", "barriers")
MERGE = "merge"  # the output's label in the report
FILES = ("measure.json", "measure_paths.png", "README.md")


@dataclass(frozen=True)
class MeasureSpec:
    """What to measure: the recipe's `measure:` block (`merging.recipe.schema.check_measure`), CLI overrides applied."""

    data: str
    points: int = 11
    probes: tuple[str, ...] = DEFAULT_PROBES
    params: str | None = None
    seq_len: int | None = None  # None: `text_data.default_seq_len`, resolved by `prepare`
    max_examples: int | None = None
    batch_size: int = 8
    seed: int = 0

    @classmethod
    def resolve(cls, block: dict[str, Any] | None, hessian: bool = False, **overrides: Any) -> MeasureSpec | None:
        """The spec from `block` with the non-None `overrides` on top (`hessian` adds the probe); None when no data
        is named (nothing is measured)."""
        from merging.recipe.schema import check_measure

        merged = {**(block or {}), **{k: v for k, v in overrides.items() if v is not None}}
        if hessian:
            merged["probes"] = list(dict.fromkeys([*(merged.get("probes") or DEFAULT_PROBES), "hessian"]))
        check_measure(merged, "measure")
        if not merged.get("data"):
            given = [f"--measure-{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
            if given or hessian:
                raise DataError(f"{(given or ['--measure-hessian'])[0]}: nothing to measure without --measure DATA "
                                "(or measure: data: in the recipe)")
            return None
        merged["probes"] = tuple(merged.get("probes") or DEFAULT_PROBES)
        return cls(**merged)

    def to_json(self) -> dict[str, Any]:
        return {"data": Path(self.data).name, "points": self.points, "probes": list(self.probes),
                "params": self.params, "seq_len": self.seq_len, "max_examples": self.max_examples,
                "batch_size": self.batch_size, "seed": self.seed}


# --- adapters: the only calls into the data, loss and path API --------------------------------------------------
def _load_data(model_or_ref: object, spec: MeasureSpec) -> list:
    from evaluations.text_data import load_data

    return load_data(model_or_ref, spec.data, seq_len=spec.seq_len, max_examples=spec.max_examples,
                     batch_size=spec.batch_size, seed=spec.seed)


def _loss(model: nn.Module, data: list):
    """The objective's `LossReport`: loss, perplexity (token objectives), accuracy, rows counted (in the
    objective's `unit`: predicted tokens for an LM, pairs for an encoder), examples."""
    from evaluations.measure import measure_loss

    return measure_loss(model, data)


def _row(r) -> dict[str, float | int | None]:
    return {"loss": r.loss, "perplexity": r.perplexity, "accuracy": r.accuracy, "tokens": r.rows, "unit": r.unit,
            "examples": r.examples}


# --- before the merge -------------------------------------------------------------------------------------------
@dataclass
class Session:
    """What `prepare` built: the spec, the inputs (label -> open checkpoint), the model and its objective."""

    spec: MeasureSpec
    inputs: dict[str, Any]
    model: nn.Module
    objective: Any
    data: list
    data_sha256: str
    base_ref: str | None = None


def _open(ref: str, allow_pickle: bool):
    from merging.io.checkpoint import open_checkpoint

    return open_checkpoint(ref, allow_pickle=allow_pickle, label=ref)


def _config_folder(ckpt, ref: str) -> Path:
    folder = getattr(ckpt, "folder", None)
    if folder is None or not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{folder or ref}: no config.json beside the weights; --measure builds the model from "
                              "it (measure transformers checkpoints, or merge without --measure)")
    return Path(folder)


def _check_recipe(recipe) -> None:
    if recipe.slices is not None:
        raise BasinError("--measure: a slices: merge (layers stacked from several models) has no path from its "
                         "inputs to the output; measure a models: merge")
    if len(recipe.grid_points()) > 1:
        raise BasinError("--measure: a sweep ({grid: ...} settings) writes several outputs; measure one point")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise DataError(f"--measure {path}: cannot read ({err.strerror or err})") from None
    return h.hexdigest()


def prepare(recipe, spec: MeasureSpec, device: str = "cpu", allow_pickle: bool = False) -> Session:
    """Every check the measurement needs, before the merge reads a tensor (see the module docstring)."""
    from evaluations.load_names import fused_view
    from evaluations.model_losses import objective_for
    from evaluations.models import build_model, check_names, load_config, model_class, parse_device
    from merging.architectures import config_source

    _check_recipe(recipe)
    if not Path(spec.data).is_file():
        raise DataError(f"--measure {spec.data}: no such text file")
    inputs = {ref: _open(ref, allow_pickle) for ref in recipe.model_refs()}
    folders = {ref: _config_folder(ckpt, ref) for ref, ckpt in inputs.items()}
    folder = folders[config_source(recipe)]
    config = load_config(folder)
    model = build_model(config, model_class(config, folder / "config.json"), torch.float32, parse_device(device))
    model.basin_folder = folder
    for ref, ckpt in inputs.items():
        check_names(model, fused_view(model, ckpt), ref)
    objective = objective_for(model)
    data = _load_data(model, spec)
    spec = replace(spec, seq_len=data.seq_len)  # the length used, in measure.json and the card
    return Session(spec, inputs, model, objective, data, _sha256(spec.data), recipe.base_model)


# --- after the merge --------------------------------------------------------------------------------------------
def _write_weights(model: nn.Module, ckpt, label: str) -> None:
    from evaluations.load_names import fused_view
    from evaluations.models import check_names, copy_weights

    ckpt = fused_view(model, ckpt)
    copy_weights(model, ckpt, check_names(model, ckpt, label))


def _output_data(session: Session, out) -> list:
    """DATA tokenised with the output's tokenizer; it must give the inputs' token ids (one vocabulary)."""
    data = _load_data(out.folder, session.spec)
    same = len(data) == len(session.data) and all(torch.equal(a["input_ids"], b["input_ids"])
                                                  for a, b in zip(data, session.data))
    if not same:
        raise DataError(f"--measure {session.spec.data}: the output's tokenizer gives other token ids than the "
                        "inputs' (the merge changed the vocabulary); the models cannot be compared on one text")
    return data


def _series(result) -> dict[str, list[float]]:
    out = {"alphas": [float(a) for a in result.alphas], "loss": [float(v) for v in result.loss],
           "accuracy": [float(v) for v in result.accuracy]}
    if getattr(result, "perplexity", None) is not None:
        out["perplexity"] = [float(v) for v in result.perplexity]
    return out


def _ties_agree(model: nn.Module, source) -> bool:
    """Whether writing `source` as a point (`lm_path.write_point`: each storage from the first name of its tied
    group) gives the weights `copy_weights` gives (each name copied in turn: the last name of the group wins)."""
    from evaluations.models import tied_groups

    names = source.names
    return all(names[g[0]] == names[g[-1]] or torch.equal(source.ckpt.get(names[g[0]]), source.ckpt.get(names[g[-1]]))
               for g in tied_groups(model).values() if len(g) > 1)


def _integers_agree(model: nn.Module, source, first) -> bool:
    """Whether `source`'s integer tensors equal `first`'s (a point takes its integer tensors from its first
    source)."""
    from evaluations.lm_path import unique_tensors

    return all(torch.equal(source.ckpt.get(source.names[n]), first.ckpt.get(first.names[n]))
               for n, t in unique_tensors(model) if not t.is_floating_point())


class _Points:
    """Every loss of the report, each distinct model measured once (Issue 20: the report costs its forward
    passes). A model's loss (its weights copied in, `_loss`) is also the alpha = 0 or 1 point of each path that
    ends at it: writing that point (`lm_path.write_point`, weights (1, 0) or (0, 1) in float64) gives the same
    weights (float32 and bf16 values are exact doubles; x * 1 + y * 0 = x, up to the sign of a zero), so the same
    loss, whenever the objective's sums are those of `lm_path.measure` (cross-entropy), the checkpoint's tied
    names agree and the path's first source has the same integer tensors; otherwise, and for a loss that is not
    finite (a NaN in either end: the point raises what it always raised), the point is evaluated as before.
    Inputs and merge are opened and their names checked once. `tests/evaluations/test_merge_measure.py` compares
    measure.json with every point evaluated on its own, byte for byte."""

    def __init__(self, session: Session, models: dict[str, Any], data: list):
        from evaluations.lm_path import CheckpointSource, objective_of

        self.model, self.data, self.points = session.model, data, session.spec.points
        self.sources = {label: CheckpointSource(self.model, ckpt, label) for label, ckpt in models.items()}
        self.objective = objective_of(self.model, data)
        self.known: dict[str, Any] = {}  # label -> LossReport
        self.ties: dict[str, bool] = {}

    def loss(self, label: str):
        """Model `label`'s `LossReport`, its weights copied in as `load_model` does."""
        from evaluations.models import copy_weights

        if label not in self.known:
            src = self.sources[label]
            copy_weights(self.model, src.ckpt, src.names)
            self.known[label] = _loss(self.model, self.data)
        return self.known[label]

    def _endpoint(self, label: str, first: str):
        """The path point at model `label` from its loss, or None where it must be evaluated as a point."""
        from evaluations.lm_path import Measure

        if self.objective.loss != "cross_entropy":
            return None
        if label not in self.ties:
            self.ties[label] = _ties_agree(self.model, self.sources[label])
        if not self.ties[label] or (label != first and not _integers_agree(self.model, self.sources[label],
                                                                           self.sources[first])):
            return None
        r = self.loss(label)
        if not math.isfinite(r.loss):  # evaluated as a point, it raises what the path always raised
            return None
        return Measure(loss=r.loss, accuracy=r.accuracy, rows=r.rows, examples=r.examples)

    def path(self, a: str, b: str):
        """The line from model `a` to model `b` (`spec.points` alphas), as `lm_path.evaluate_checkpoint_path`."""
        from evaluations.landscape.checkpoint_paths import CheckpointPath
        from evaluations.landscape.evaluate import alpha_grid
        from evaluations.lm_path import evaluate_checkpoint_points, path_result

        grid = alpha_grid(self.points).tolist()
        ends = {0.0: a, 1.0: b}
        measures = [self._endpoint(ends[x], a) if x in ends else None for x in grid]
        todo = [i for i, m in enumerate(measures) if m is None]
        if todo:
            line = CheckpointPath([self.sources[a], self.sources[b]])
            weights = np.array([line.weights(grid[i]) for i in todo])
            got, _ = evaluate_checkpoint_points(self.model, line.refs, weights, self.data, self.objective)
            for i, m in zip(todo, got):
                measures[i] = m
        return path_result(np.array(grid), measures, self.objective)


def _barriers(session: Session, points: _Points) -> list[dict[str, Any]]:
    from evaluations.landscape import barrier

    refs = list(session.inputs)
    rows = []
    for i, a in enumerate(refs):
        for b in refs[i + 1:]:
            result = points.path(a, b)
            rows.append({"a": a, "b": b, "loss_barrier": barrier(result, "loss", "linear").to_json(),
                         "error_barrier": barrier(result, "error", "linear").to_json(), "path": _series(result)})
    return rows


def measure(session: Session, out_dir: str | Path, stats=None) -> MeasureReport:
    """The report on the merged output `out_dir` (see the module docstring); `stats`: a `MergeStats` or None."""
    from evaluations.load_names import fused_view
    from evaluations.models import check_names

    out = _open(str(out_dir), False)
    check_names(session.model, fused_view(session.model, out), str(out_dir))  # the output fits (names, shapes)
    data = _output_data(session, out)
    models = {**session.inputs, MERGE: out}
    probes = session.spec.probes
    report = MeasureReport(spec=session.spec, objective=session.objective.name, data_sha256=session.data_sha256,
                           models=list(models), stats=None if stats is None else stats.to_json())
    points = _Points(session, models, data) if {"loss", "paths", "barriers"} & set(probes) else None
    if "loss" in probes:
        report.losses = {label: _row(points.loss(label)) for label in models}
    if "paths" in probes:
        report.paths = [{"from": ref, "to": MERGE, **_series(points.path(ref, MERGE))} for ref in session.inputs]
        report.figure = _Figure(report.paths)  # drawn while the barriers run
    if "barriers" in probes:
        report.barriers = _barriers(session, points)
    if "hessian" in probes:
        if report.figure is not None:  # no imports of two threads at once (the probes import their own)
            report.figure.png()
        report.hessian = [_top_eigenvalue(session, ckpt, label, data) for label, ckpt in models.items()]
    return report


# --- the Hessian probe ------------------------------------------------------------------------------------------
def _top_eigenvalue(session: Session, ckpt, label: str, data: list) -> dict[str, Any]:
    from evaluations.probes import HessianOperator, lanczos

    _write_weights(session.model, ckpt, label)
    # the objective's row-weighted mean loss over `data` (the dataset loss): the operator's own batch weighting
    op = HessianOperator(session.model, session.objective, data, params=session.spec.params)
    eig = lanczos(op, k=1, tol=1e-3, seed=session.spec.seed)
    value = float(eig.values[0])
    if not math.isfinite(value):
        raise BasinError(f"{label}: the top Hessian eigenvalue is not finite ({value})")
    return {"model": label, "top_eigenvalue": value, "converged": bool(eig.converged),
            "error_bound": float(eig.extra["error_bounds"][0]), "iterations": int(eig.iterations),
            "params": int(op.size)}


# --- the report -------------------------------------------------------------------------------------------------
@dataclass
class MeasureReport:
    spec: MeasureSpec
    objective: str
    data_sha256: str
    models: list[str]
    losses: dict[str, dict[str, float | int]] = field(default_factory=dict)
    paths: list[dict[str, Any]] = field(default_factory=list)
    barriers: list[dict[str, Any]] = field(default_factory=list)
    hessian: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    plot: str | None = None  # "measure_paths.png", or None (no paths, or no matplotlib)
    figure: _Figure | None = field(default=None, repr=False, compare=False)  # the plot being drawn (`measure`)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "data_sha256": self.data_sha256, "objective": self.objective,
                "models": self.models, "losses": self.losses, "paths": self.paths, "barriers": self.barriers,
                "hessian": self.hessian, "merge_stats": self.stats, "plot": self.plot}

    def card_section(self) -> str:
        """The model card's "Measurements" section (markdown)."""
        first = next(iter(self.losses.values()), None)
        size = (f"{first['examples']} examples of {self.spec.seq_len} tokens, {first['tokens']} "
                f"{first.get('unit', 'rows')}; ") if first else ""
        lines = [f"Measured by `basin merge --measure` on `{Path(self.spec.data).name}` ({size}sha256 "
                 f"`{self.data_sha256[:16]}`), objective: {self.objective}. Full results: `measure.json`.", ""]
        lines += _loss_table(self.losses) + _barrier_table(self.barriers) + _hessian_table(self.hessian)
        lines += _stats_lines(self.stats)
        if self.paths:
            lines += (["![loss along the paths from each input to the merge](measure_paths.png)", ""] if self.plot
                      else ["No plot of the paths: matplotlib is not installed (`pip install 'basin[plot]'`).", ""])
        return "\n".join(lines)


def _label(name: str) -> str:
    return "**merge**" if name == MERGE else f"`{name}`"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _loss_table(losses: dict[str, dict]) -> list[str]:
    if not losses:
        return []
    rows = [f"| {_label(m)} | {r['loss']:.4f} | {_number(r['perplexity'], 3)} | {_number(r['accuracy'], 4)} |"
            for m, r in losses.items()]
    return ["| model | loss | perplexity | next-token accuracy |", "|---|---|---|---|", *rows, ""]


def _barrier_table(barriers: list[dict]) -> list[str]:
    if not barriers:
        return []
    rows = [f"| `{b['a']}` | `{b['b']}` | {b['loss_barrier']['value']:.4f} | {b['loss_barrier']['alpha']:.2f} |"
            for b in barriers]
    return ["Loss barriers between the inputs (chord form: max over alpha of the loss above the straight line "
            "between the endpoints' losses):", "", "| A | B | loss barrier | at alpha |", "|---|---|---|---|",
            *rows, ""]


def _hessian_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    body = [f"| {_label(r['model'])} | {r['top_eigenvalue']:.5g} | {r['converged']} |" for r in rows]
    return [f"Top Hessian eigenvalue of the loss ({rows[0]['params']} parameters, Lanczos):", "",
            "| model | top eigenvalue | converged |", "|---|---|---|", *body, ""]


def _stats_lines(stats: dict | None) -> list[str]:
    if not stats or not stats.get("inputs"):
        return []
    model, labels = stats["model"], stats["inputs"]
    ref = f"relative to `{stats['relative_to']}`" if stats["relative_to"] else "the weights themselves (no base)"
    rows = [f"| `{label}` | {model['norms'][i]:.4g} | " + " | ".join(
        "-" if c is None else f"{c:.3f}" for c in model["cosines"][i]) + " |" for i, label in enumerate(labels)]
    lines = [f"Task vectors ({ref}), over the whole model; sign-conflict rate "
             f"{model['sign_conflict_rate']:.4f}:", "",
             "| input | norm | " + " | ".join(f"cos `{x}`" for x in labels) + " |",
             "|---|---|" + "---|" * len(labels), *rows, ""]
    if "dropped" in model:
        how = "exact" if stats["dropped"]["exact"] else "expected, from density"
        lines += ["Fraction of each task vector the method zeroes (" + how + "): " + ", ".join(
            f"`{label}` {d:.3f}" for label, d in zip(labels, model["dropped"])) + ".", ""]
    return lines


# --- writing --------------------------------------------------------------------------------------------------
def render_paths(paths: list[dict[str, Any]]) -> bytes | None:
    """The PNG of the loss along each input -> merge path (alpha 0: the input, 1: the merge); None without
    matplotlib."""
    import io

    from evaluations.plotting import optional_pyplot

    plt = optional_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for p in paths:
            ax.plot(p["alphas"], p["loss"], "o-", markersize=3, label=p["from"])
        ax.set_xlabel("alpha (0: input, 1: merge)")
        ax.set_ylabel("loss")
        ax.set_title("loss along the paths to the merge")
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, metadata={"Software": None})
        return png.getvalue()
    finally:
        plt.close(fig)


def plot_paths(report: MeasureReport, path: Path) -> str | None:
    """`render_paths(report.paths)` written to `path`; None (nothing written) without matplotlib."""
    from merging.io.atomic import atomic_write

    png = render_paths(report.paths)
    if png is None:
        return None
    atomic_write(path, lambda tmp: tmp.write_bytes(png))
    return str(path)


class _Figure:
    """`render_paths` on a thread, started as soon as the paths are measured: matplotlib's import and the drawing
    (about a second of CPU) overlap the barriers' forward passes, which release the GIL in torch's ops. `png()`
    waits for it and re-raises what it raised."""

    def __init__(self, paths: list[dict[str, Any]]):
        import threading

        self.paths = paths
        self._png: bytes | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._draw, name="basin-measure-plot", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        try:
            self._png = render_paths(self.paths)
        except BaseException as err:  # handed to the caller of png()
            self._error = err

    def png(self) -> bytes | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._png


def write_report(report: MeasureReport, out_dir: str | Path) -> tuple[MeasureReport, list[Path]]:
    """measure.json, measure_paths.png (with matplotlib) and the card's section, each written atomically into the
    merged output; returns the report as written (with its `plot`) and the files."""
    from evaluations.cli.outputs import Outputs
    from merging.output.model_card import with_section

    with Outputs(overwrite=True) as outputs:
        folder = outputs.folder(out_dir, list(FILES), "OUT_DIR")
        figure = report.figure if report.figure is not None and report.figure.paths == report.paths else None
        png = figure.png() if figure is not None else render_paths(report.paths) if report.paths else None
        if png is not None:
            report = replace(report, plot=FILES[1])
            outputs.write(folder / FILES[1], lambda tmp: tmp.write_bytes(png))
        outputs.write_text(folder / FILES[0], json.dumps(report.to_json(), indent=2) + "\n")
        card = folder / FILES[2]
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        outputs.write_text(card, with_section(text, "Measurements", report.card_section()))
        return report, outputs.commit()
