"""A benchmark result as markdown tables, and the aggregation of per-seed results (mean, std over seeds)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

NOTE = ("norm. avg: mean over tasks of merged / individual fine-tune accuracy (per seed, then over seeds). "
        "± : standard deviation over seeds (ddof 1). barrier→FT: mean over tasks t of the loss barrier (chord form, "
        "Entezari et al. 2022 def. 2.1) along the linear path from the row's body to fine-tune t, on task t's test "
        "split through its head. ‖θ−θ₀‖: L2 distance of the merged body from the pretrained body. data: what the "
        "merge read beyond the weights; 'val picks' = hyperparameters chosen on the validation split, never on test.")


def _pm(value: float | None, spread: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return ""
    text = f"{scale * value:.{digits}f}"
    return text if spread is None else f"{text} ± {scale * spread:.{digits}f}"


def _params(row: Any) -> str:
    per = [", ".join(f"{k}={v}" for k, v in p.get("params", {}).items()) for p in row.per_seed]
    if per and len(set(per)) > 1:
        return " / ".join(per) + " (per seed)"
    return ", ".join(f"{k}={v}" for k, v in row.params.items())


def table_rows(result: Any) -> list[list[str]]:
    head = ["method", *result.tasks, "avg", "norm. avg", "barrier→FT", "‖θ−θ₀‖", "data", "params"]
    out = [head]
    for r in result.rows:
        out.append([r.label, *(f"{100 * r.scores[t]:.1f}" for t in result.tasks),
                    _pm(r.average, r.spread.get("average")),
                    _pm(r.normalized_average, r.spread.get("normalized_average")),
                    _pm(r.barrier, r.spread.get("barrier"), 1.0, 3),
                    "" if r.distance_from_base is None else f"{r.distance_from_base:.2f}", r.data, _params(r)])
    return out


def _table(rows: list[list[str]], text_columns: int = 2) -> list[str]:
    rule = "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1 - text_columns) + ["---"] * text_columns) + "|"
    return ["| " + " | ".join(rows[0]) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def landscape_markdown(result: Any) -> list[str]:
    """Per row with paths: the barrier to each fine-tune, and the mean and max loss along those paths."""
    rows = [r for r in result.rows if r.paths]
    if not rows:
        return []
    head = ["method", *(f"barrier→{t}" for t in result.tasks), "mean loss on paths", "max loss on paths"]
    body = [head]
    for r in rows:
        losses = [v for t in result.tasks for v in r.paths["loss"][t]]
        body.append([r.label, *(f"{r.paths['barrier'][t]:.3f}" for t in result.tasks),
                     f"{sum(losses) / len(losses):.3f}", f"{max(losses):.3f}"])
    points = len(rows[0].paths["alphas"])
    return ["### Merges' landscape", "", *_table(body, 0), "",
            f"Linear path from the row's body (alpha 0) to each fine-tune (alpha 1), {points} points, test "
            "cross-entropy of the fine-tune's task through its head (mean over seeds); the curves are in the JSON "
            "(rows[].paths) and the plot.", ""]


def geometry_markdown(geometry: Mapping[str, Any], models: list[str]) -> list[str]:
    if not geometry:
        return []
    lines = ["### Fine-tunes' geometry", "", "| model | ‖τ‖ (from base) | " + " | ".join(f"cos {m}" for m in models)
             + " | " + " | ".join(f"barrier {m}" for m in models) + " |",
             "|---|" + "---:|" * (1 + 2 * len(models))]
    for i, m in enumerate(models):
        cos = [f"{geometry['cosine'][i][j]:.3f}" for j in range(len(models))]
        bar = [f"{geometry['barrier'][i][j]:.3f}" for j in range(len(models))]
        lines.append(f"| {m} | {geometry['distance_from_base'][i]:.2f} | " + " | ".join(cos) + " | "
                     + " | ".join(bar) + " |")
    lines += ["", geometry.get("note", "")]
    return lines


def to_markdown(result: Any) -> str:
    seeds = result.seeds or [result.seed]
    lines = [f"## {result.suite}: accuracy (%) per task", "", *_table(table_rows(result)), "", NOTE, ""]
    lines += landscape_markdown(result)
    lines += geometry_markdown(result.geometry, list(result.geometry.get("models", [])))
    prepared = result.environment.get("suite_seconds")
    workers = result.environment.get("workers")
    if workers:
        lines += ["", f"{len(result.rows)} rows, seeds {seeds}, executor {result.executor} on {workers} worker "
                  f"processes: {result.wall_seconds:.1f} s wall for training and cells together "
                  f"({result.cached_cells} cells from cache; the last suite ready at {prepared:.1f} s)."]
    else:
        lines += ["", f"{len(result.rows)} rows, seeds {seeds}, executor {result.executor}, "
                  f"cells wall {result.wall_seconds:.1f} s ({result.cached_cells} cells from cache)"
                  + ("." if prepared is None else f"; suites loaded (training if not cached) in {prepared:.1f} s.")]
    return "\n".join(lines) + "\n"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_paths(paths: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not paths or not paths[0]:
        return {}
    out: dict[str, Any] = {"alphas": paths[0]["alphas"]}
    for key in ("loss", "accuracy"):
        out[key] = {t: [_mean(v) for v in zip(*(p[key][t] for p in paths))] for t in paths[0][key]}
    for key in ("barrier", "error_barrier"):
        out[key] = {t: _mean([p[key][t] for p in paths]) for t in paths[0][key]}
    return out


def _aggregate_row(rows: Sequence[Any], seeds: Sequence[int]) -> Any:
    from evaluations.bench.harness import Row

    first = rows[0]
    tasks = list(first.scores)
    distances = [r.distance_from_base for r in rows]
    out = Row(first.label, first.kind, {t: _mean([r.scores[t] for r in rows]) for t in tasks}, dict(first.params),
              [], None if distances[0] is None else _mean(distances), sum(r.seconds for r in rows),
              {t: _mean([r.normalized[t] for r in rows]) for t in first.normalized}, first.data,
              _mean_paths([r.paths for r in rows]))
    out.spread = {**{t: _std([r.scores[t] for r in rows]) for t in tasks}, "average": _std([r.average for r in rows])}
    if first.normalized:
        out.spread["normalized_average"] = _std([r.normalized_average for r in rows])
    if first.barrier is not None:
        out.spread["barrier"] = _std([r.barrier for r in rows])
    out.per_seed = [{"seed": s, "average": r.average, "normalized_average": r.normalized_average,
                     "barrier_to_finetunes": r.barrier, "params": r.params, "selection": r.selection}
                    for s, r in zip(seeds, rows)]
    return out


def _mean_geometry(geos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not geos or not geos[0]:
        return {}
    out = dict(geos[0])
    out["distance_from_base"] = [_mean(v) for v in zip(*(g["distance_from_base"] for g in geos))]
    for key in ("cosine", "barrier", "error_barrier"):
        out[key] = [[_mean(v) for v in zip(*rows)] for rows in zip(*(g[key] for g in geos))]
    if len(geos) > 1:
        out["note"] = out.get("note", "") + f" Mean over {len(geos)} seeds."
    return out


def aggregate(results: Sequence[Any]) -> Any:
    """One result whose rows are the per-seed rows' means, with `spread` (std over seeds) and `per_seed`."""
    from evaluations.bench.harness import BenchmarkResult

    if not results:
        raise ValueError("aggregate: no results")
    seeds = [r.seed for r in results]
    labels = [r.label for r in results[0].rows]
    rows = [_aggregate_row([res.row(label) for res in results], seeds) for label in labels]
    env = dict(results[0].environment)
    times = [r.environment.get("suite_seconds") for r in results]
    if all(t is not None for t in times):
        env["suite_seconds"] = sum(times)
    return BenchmarkResult(results[0].suite, results[0].tasks, rows, _mean_geometry([r.geometry for r in results]),
                           seeds[0], results[0].executor, sum(r.wall_seconds for r in results),
                           sum(r.cached_cells for r in results), env, seeds)

