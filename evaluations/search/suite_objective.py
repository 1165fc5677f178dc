"""The `--suite FILE` objective: a benchmark suite's average normalized accuracy, as `basin bench --suite` reports it.

Normalized accuracy (Yadav et al. 2023, TIES-Merging, sec. 6; FusionBench): per task, the merged body's accuracy
(through the task's own head) over the task's fine-tune's accuracy, averaged over the tasks. The search maximises it
on the tasks' validation splits; the best trial is reported on their test splits, the figure `basin bench` gives
as `normalized_average` for the same merge.

The search recipe names the suite's models as `suite:base` and `suite:<task>` (`suite_refs` replaces them with the
suite's own references, so best.yaml is a plain recipe) or by the same paths. Per worker, `SuiteObjective` loads the
suite once and scores the fine-tunes once (the normalizers, on both splits); per trial the merged tensors are
copied into one live body module (the suite's body names: the checkpoint names with the base model's prefix
dropped and `model.` put in front for Hugging Face suites, the file's own names for safetensors suites).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from taxonomy.errors import BasinError

PREFIX = "suite:"


def suite_sources(path: str | Path) -> dict[str, str]:
    """`base` and every task name -> the model reference the suite file gives it (resolved against its folder);
    read from the YAML alone (nothing loaded)."""
    from evaluations.bench.suites.hf_suite import _reference, is_hf_suite
    from evaluations.bench.suites.yaml_suite import _read

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise BasinError(f"--suite {path}: expected a YAML suite file (its models are files a recipe can name)")
    doc, root = _read(path), path.parent
    where = f"--suite {path}"
    if is_hf_suite(doc):
        tasks = doc.get("tasks")
        if "base" not in doc or not isinstance(tasks, list):
            raise BasinError(f"{where}: needs 'base' and a list of 'tasks'")
        out = {"base": _reference(root, doc["base"], f"{where}: base")}
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or "name" not in t or "model" not in t:
                raise BasinError(f"{where}: tasks[{i}]: needs 'name' and 'model'")
            out[str(t["name"])] = _reference(root, t["model"], f"{where}: tasks[{i}].model")
        return out
    models = doc.get("models")
    if "base" not in doc or not isinstance(models, dict):
        raise BasinError(f"{where}: needs 'base' and a 'models' mapping")
    return {"base": str(root / str(doc["base"])), **{str(k): str(root / str(v)) for k, v in models.items()}}


def suite_refs(raw: Any, sources: dict[str, str], where: str = "recipe") -> Any:
    """The recipe mapping with every `suite:NAME` string replaced by the suite's reference for NAME."""
    if isinstance(raw, dict):
        return {k: suite_refs(v, sources, where) for k, v in raw.items()}
    if isinstance(raw, list):
        return [suite_refs(v, sources, where) for v in raw]
    if isinstance(raw, str) and raw.startswith(PREFIX):
        name = raw[len(PREFIX):]
        if name not in sources:
            raise BasinError(f"{where}: {raw!r}: the suite has no model {name!r}; it has {sorted(sources)}")
        return sources[name]
    return raw


def _body_names(body: dict[str, torch.Tensor], merged: dict[str, tuple[int, ...]], what: str) -> dict[str, str]:
    """merged tensor name -> body tensor name: the same name, or the merged name with one leading component
    (the base model's prefix, e.g. `bert.`) for a body name `model.<rest>`; shapes must agree."""
    out: dict[str, str] = {}
    for b, t in body.items():
        rest = b.removeprefix("model.")
        found = [n for n in (b, rest) if n in merged] or sorted(n for n in merged if n.split(".", 1)[-1] == rest
                                                                 and n.count(".") == rest.count(".") + 1)
        if not found:
            raise BasinError(f"{what}: the merged output has no tensor for the suite's body tensor {b!r}")
        if tuple(merged[found[0]]) != tuple(t.shape):
            raise BasinError(f"{what}: merged tensor {found[0]!r} has shape {tuple(merged[found[0]])}, the suite's "
                             f"body tensor {b!r} {tuple(t.shape)}")
        out[found[0]] = b
    return out


class SuiteObjective:
    """One worker's suite: the live body module, the fine-tunes' accuracies (per split), the body-name mapping."""

    def __init__(self, path: str | Path) -> None:
        from evaluations.bench.suites import load_suite

        self.path = str(path)
        self.suite = load_suite(self.path)
        pool, tasks = self.suite.models, self.suite.tasks
        for t in tasks.tasks:
            if t.val is None:
                raise BasinError(f"--suite {path}: task {t.name!r} has no validation split (the search scores on it)")
        self.body = pool.module(pool.base)
        self.state = self.body.state_dict()
        self.reference = {split: {t: tasks[t].score(pool.module(s), split) for t, s in pool.models.items()}
                          for split in ("val", "test")}
        for split, scores in self.reference.items():
            zero = [t for t, v in scores.items() if v == 0]
            if zero:
                raise BasinError(f"--suite {path}: the fine-tune of {zero[0]!r} scores 0 on its {split} split: its "
                                 "normalized accuracy is undefined")
        self._names: dict[tuple, dict[str, str]] = {}

    def targets(self, merged: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """merged tensor name (-> shape) -> the body tensor it fills (merged tensors outside the body, e.g. heads:
        none); the mapping is computed once per layout."""
        key = tuple((n, tuple(s)) for n, s in merged.items())
        if key not in self._names:
            self._names[key] = _body_names(self.state, merged, f"--suite {self.path}")
        return {m: self.state[b] for m, b in self._names[key].items()}

    def load(self, ckpt: Any) -> None:
        """Fill the body from a merged checkpoint (a trial merged on disk)."""
        with torch.no_grad():
            for name, t in self.targets({n: tuple(ckpt.meta(n).shape) for n in ckpt.names()}).items():
                t.copy_(ckpt.get(name))

    def scores(self, split: str = "val") -> dict[str, float]:
        return self.suite.tasks.evaluate(self.body, split)

    def normalized(self, split: str = "val") -> float:
        """Mean over tasks of accuracy / the fine-tune's accuracy, on `split`."""
        s, ref = self.scores(split), self.reference[split]
        return sum(s[t] / ref[t] for t in ref) / len(ref)

    def report(self) -> dict[str, Any]:
        """The body's figures on both splits, beside the fine-tunes' (the best trial's, after the search)."""
        out: dict[str, Any] = {"suite": self.suite.name, "file": self.path, "fine_tunes": self.reference}
        for split in ("val", "test"):
            s = self.scores(split)
            out[split] = {"accuracy": s, "normalized": {t: s[t] / self.reference[split][t] for t in s},
                          "normalized_average": sum(s[t] / self.reference[split][t] for t in s) / len(s)}
        return out
