"""Paths whose points are fixed weightings of N checkpoints: theta(alpha) = sum_i w_i(alpha) ckpt_i.

Such a path never holds its endpoints in memory: `evaluate_path` hands it to `evaluations.lm_path`, which keeps
the checkpoints memory-mapped and writes each point into the one live model tensor by tensor (float64 sums).

- `linear`: [A, B], w = (1 - alpha, alpha).
- `chain`: [m0, ..., mK], the polygon through the checkpoints, each segment 1/K of alpha.
- `bezier`: [A, C, B], Garipov et al. 2018 Sec. 3.1, w = ((1 - t)^2, 2 t (1 - t), t^2) with control point C.
- `polychain`: [A, C, B], Garipov et al.'s one-bend chain A -> C -> B (the `chain` of three checkpoints).

`linear_path`, `chain_path` (evaluations.landscape.paths) return one of these when given checkpoint references
(a path, a Hub id, a `merging.io.checkpoint.Checkpoint`), so the in-memory and streamed APIs read the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path as FsPath

from evaluations.landscape.paths import Path
from taxonomy.errors import BasinError

Weights = Callable[[float, int], tuple[float, ...]]


def is_checkpoint_ref(obj: object) -> bool:
    """A reference `open_checkpoint` reads lazily from disk (not a module or an in-memory dict)."""
    if isinstance(obj, (str, FsPath)):
        return True
    from merging.io.checkpoint import Checkpoint, StateDictCheckpoint

    return isinstance(obj, Checkpoint) and not isinstance(obj, StateDictCheckpoint)


def _linear(t: float, n: int) -> tuple[float, ...]:
    return (1.0 - t, t)


def _chain(t: float, n: int) -> tuple[float, ...]:
    k = n - 1
    pos = t * k
    i = min(int(pos), k - 1)
    w = [0.0] * n
    w[i], w[i + 1] = 1.0 - (pos - i), pos - i
    return tuple(w)


def _bezier(t: float, n: int) -> tuple[float, ...]:
    return ((1 - t) ** 2, 2 * t * (1 - t), t**2)


KINDS: dict[str, tuple[Weights, int | None]] = {"linear": (_linear, 2), "chain": (_chain, None),
                                                "bezier": (_bezier, 3), "polychain": (_chain, 3)}


class CheckpointPath(Path):
    """alpha in [0, 1] -> weights over `refs` (see the module docstring); `kind` is one of KINDS."""

    def __init__(self, refs: list[object], kind: str = "linear"):
        if kind not in KINDS:
            raise BasinError(f"kind={kind!r}: choose from {sorted(KINDS)}")
        fn, count = KINDS[kind]
        if len(refs) < 2 or (count is not None and len(refs) != count):
            want = f"exactly {count}" if count is not None else "at least 2"
            raise BasinError(f"a {kind} path needs {want} checkpoints, got {len(refs)}")
        self.refs, self.kind, self._fn = list(refs), kind, fn

    def weights(self, alpha: float) -> tuple[float, ...]:
        alpha = float(alpha)
        if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
            raise BasinError(f"alpha={alpha} is outside [0, 1]")
        return self._fn(alpha, len(self.refs))

    def __call__(self, alpha: float) -> dict:
        """The point as an in-memory dict (every tensor at once: for small models; evaluate_path streams)."""
        import torch

        from merging.io.checkpoint import open_checkpoint

        ckpts = [open_checkpoint(r) for r in self.refs]
        out = {}
        for name in ckpts[0].names():
            ts = [c.get(name) for c in ckpts]
            if not ts[0].is_floating_point():
                out[name] = ts[0].clone()
                continue
            acc = sum(w * t.to(torch.float64) for w, t in zip(self.weights(alpha), ts))
            out[name] = acc.to(ts[0].dtype)
        return out


def checkpoint_path(refs: list[object], kind: str = "linear") -> CheckpointPath:
    """A streamed path over checkpoints: `kind` in linear / chain / bezier / polychain (module docstring)."""
    return CheckpointPath(refs, kind)
