"""What a finished (or interrupted) search writes: best.yaml, trials.json/.csv, search.json and search.png.

`best.yaml` is the search recipe with the best trial's values filled in (a plain recipe: `basin merge best.yaml
OUT`); with several objectives, the Pareto front's trial best on the first objective (the whole front is in
search.json). Times per trial: `merge_seconds` (the recipe planned and merged) and `score_seconds` (the worker's),
`wall_seconds` (the driver's, from ask to just before tell) and `duration_seconds` (Optuna's, ask to tell; the trial
is stored after it, by a writer thread while the next one runs): `time_per_trial` in search.json gives the mean
overhead, the duration beyond merge and score (sampler, transfers). With `--suite`, search.json's `suite` holds the
best trial's accuracies and normalized accuracies on the suite's validation and test splits.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from evaluations.search.study import optuna_module
from merging.recipe.search_space import SearchSpace

TIMES = ("merge_seconds", "score_seconds", "seconds", "wall_seconds", "duration_seconds")
FILES = ("best.yaml", "trials.json", "trials.csv", "search.json", "search.png")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, params, objective values, times, where it ran."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
               "values": None if t.values is None else list(t.values)}
        attrs = t.user_attrs.get("basin", {})
        row.update({k: attrs.get(k) for k in (*TIMES[:-1], "mode", "worker")})
        row["duration_seconds"] = None if t.duration is None else t.duration.total_seconds()
        rows.append(row)
    return rows


def best_trials(study: Any) -> list[Any]:
    """The best trial (one objective) or the Pareto front sorted by the first objective; [] before any."""
    optuna = optuna_module()
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return sorted(study.best_trials, key=lambda t: (sign * t.values[0], t.number))


def best_yaml(space: SearchSpace, trial: Any, names: list[str]) -> str:
    import yaml

    head = ", ".join(f"{n} = {v:.6g}" for n, v in zip(names, trial.values))
    body = yaml.safe_dump(space.filled(dict(trial.params)), sort_keys=False)
    return f"# basin search: best of the study (trial {trial.number}: {head})\n{body}"


def csv_text(rows: list[dict[str, Any]], labels: list[str], names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state", *labels, *names, *TIMES, "mode", "worker"])
    for r in rows:
        values = r["values"] or [None] * len(names)
        w.writerow([r["number"], r["state"], *(r["params"].get(k) for k in labels), *values,
                    *(r[k] for k in TIMES), r["mode"], r["worker"]])
    return buf.getvalue()


def overhead(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean seconds per completed trial: its duration in the study (ask to tell, Optuna's clock), merge, score, and
    the fraction of the duration beyond merge + score (sampler, storage, transfers: the search's overhead)."""
    keys = ("duration_seconds", "merge_seconds", "score_seconds")
    done = [r for r in rows if r["state"] == "complete" and all(r[k] is not None for k in keys)]
    if not done:
        return None
    mean = {k: sum(r[k] for r in done) / len(done) for k in keys}
    extra = mean["duration_seconds"] - mean["merge_seconds"] - mean["score_seconds"]
    mean["overhead_fraction"] = extra / mean["duration_seconds"] if mean["duration_seconds"] > 0 else math.nan
    return mean


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) for the first objective; {} when they cannot be computed yet."""
    import warnings

    optuna = optuna_module()
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                                target=lambda t: t.values[0]))
    except (RuntimeError, ValueError, ZeroDivisionError, ImportError):
        return {}


def summary(study: Any, space: SearchSpace, names: list[str], rows: list[dict[str, Any]],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """search.json: the study, space, trial counts, best trial(s), importances, time per trial, and `extra` (e.g. the
    suite objective's best trial on the test splits)."""
    best = best_trials(study)
    return {**(extra or {}),
        "study": study.study_name, "objectives": names, "directions": [d.name.lower() for d in study.directions],
        "space": space.to_json(), "defaults": space.defaults(),
        "trials": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")},
        "best": [{"number": t.number, "params": dict(t.params), "values": list(t.values)} for t in best],
        "importance": importances(study), "time_per_trial": overhead(rows),
    }


def plot(path: Path, rows: list[dict[str, Any]], names: list[str], importance: dict[str, float],
         minimize: bool) -> bool:
    """Objective against trial (and best so far); parameter importances. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in rows if r["state"] == "complete"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    xs, ys = [r["number"] for r in done], [r["values"][0] for r in done]
    best = [min(ys[:k + 1]) if minimize else max(ys[:k + 1]) for k in range(len(ys))]
    axes[0].plot(xs, ys, "o", ms=3, label="trial")
    axes[0].step(xs, best, where="post", label="best so far")
    axes[0].set(xlabel="trial", ylabel=names[0], title="objective")
    axes[0].legend()
    labels = list(importance)[::-1]
    axes[1].barh(labels, [importance[k] for k in labels])
    axes[1].set(xlabel="importance (fANOVA)", title="parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(outputs: Any, out: Path, study: Any, space: SearchSpace, names: list[str],
          extra: dict[str, Any] | None = None) -> list[Path]:
    """Every report file into `out` through `outputs` (`evaluations.cli.outputs.Outputs`: atomic, planned)."""
    rows = trial_rows(study)
    info = summary(study, space, names, rows, extra)
    best = best_trials(study)
    if best:
        outputs.write_text(out / "best.yaml", best_yaml(space, best[0], names))
    outputs.write_text(out / "trials.json", json.dumps(rows, indent=1) + "\n")
    outputs.write_text(out / "trials.csv", csv_text(rows, [d.label for d in space.dims], names))
    outputs.write_text(out / "search.json", json.dumps(info, indent=1, default=str) + "\n")
    minimize = info["directions"][0] == "minimize"
    if any(r["state"] == "complete" for r in rows):
        outputs.write(out / "search.png", lambda tmp: plot(tmp, rows, names, info["importance"], minimize))
    return outputs.commit()
