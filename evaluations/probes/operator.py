"""The linear-operator protocol every spectral probe takes (Lanczos, Hutchinson / Hutch++, SLQ, sharpness).

An operator is a square linear map on flat vectors: `shape` (n, n), `dtype`, `device`, `matvec(v)` ([n] ->
[n]) and `matmat(V)` (applied to the rows of V, [k, n] -> [k, n]), plus `to_scipy()` for
`scipy.sparse.linalg`. `gradient()` is optional: an operator that has it (the Hessian of a loss) lets
Lanczos start from the loss gradient (see `evaluations.probes.lanczos.start_vector`). `mode` is optional
too (a `HessianOperator`'s network mode, reported by the probes). `Operator` gives the defaults;
`DenseOperator` wraps a matrix, `CallableOperator` a function; `as_operator` turns what a probe is given
(an operator, a matrix, or a callable with `size=`) into one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from taxonomy.errors import ProbeError


@runtime_checkable
class LinearOperator(Protocol):
    """A square linear map on flat vectors of length shape[0] (symmetric for the spectral probes)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def matmat(self, vs: torch.Tensor) -> torch.Tensor: ...

    def to_scipy(self): ...


class Operator:
    """Defaults for `LinearOperator`: `matmat` row by row through `matvec`, `op @ v`, `to_scipy()`.

    A subclass sets `shape`, `dtype`, `device` and defines `matvec`."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    mode: str | None = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """Apply to each row of `vs` ([k, n]) -> [k, n]."""
        self._check_rows(vs)
        return torch.stack([self.matvec(v) for v in vs]) if len(vs) else vs.new_zeros(0, self.shape[0])

    def _check_rows(self, vs: torch.Tensor) -> None:
        if vs.dim() != 2 or vs.shape[1] != self.shape[1]:
            raise ProbeError(f"{type(self).__name__}.matmat: expected [k, {self.shape[1]}] rows, got {tuple(vs.shape)}")

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def to_scipy(self):
        """A `scipy.sparse.linalg.LinearOperator` (numpy in and out, float64 for a float64 operator)."""
        return to_scipy(self)


class DenseOperator(Operator):
    """An explicit [n, n] matrix as an operator (for tests, and for users with a small matrix)."""

    def __init__(self, matrix: torch.Tensor):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise ProbeError(f"operator: expected a square matrix, got {shape}")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype, self.device = matrix.dtype, matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        self._check_rows(vs)
        return vs @ self.matrix.T


class CallableOperator(Operator):
    """A function v -> A v on vectors of length `size` as an operator (`dtype`: of the vectors it is given)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ProbeError(f"size: expected a positive integer, got {size!r}")
        self.fn = fn
        self.shape = (size, size)
        self.dtype, self.device = dtype, torch.device(device)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.fn(v)


def as_operator(op, size: int | None = None) -> LinearOperator:
    """An operator, a square matrix, or a callable (with `size`) -> a `LinearOperator`.

    `size`, when given, must match the operator's (it is required for a plain callable)."""
    if isinstance(op, LinearOperator):
        out = op
    elif isinstance(op, torch.Tensor):
        out = DenseOperator(op)
    elif callable(op):
        if size is None:
            raise ProbeError("operator: pass size= for a plain callable")
        return CallableOperator(op, size)
    else:
        raise ProbeError(f"operator: expected a LinearOperator, a matrix or a callable, got {type(op).__name__}")
    if size is not None and size != out.shape[0]:
        raise ProbeError(f"size: {size} does not match the operator's size {out.shape[0]}")
    return out


def operator_mode(op) -> str | None:
    """The network mode of a `HessianOperator` ("eval" / "train"); None for an operator without one (a
    string attribute only: `torch.Tensor.mode` is a method)."""
    mode = getattr(op, "mode", None)
    return mode if isinstance(mode, str) else None


def has_gradient(op) -> bool:
    """Whether the operator provides the optional `gradient()`."""
    return callable(getattr(op, "gradient", None))


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def to_scipy(op: LinearOperator):
    """`op` as a `scipy.sparse.linalg.LinearOperator`: numpy vectors (columns for matmat) in and out."""
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1)).to(op.device, op.dtype)
        return op.matvec(v).detach().cpu().double().numpy().astype(_numpy_dtype(op.dtype))

    def matmat(x: np.ndarray) -> np.ndarray:
        rows = torch.as_tensor(np.ascontiguousarray(x.T)).to(op.device, op.dtype)
        return op.matmat(rows).detach().cpu().double().numpy().astype(_numpy_dtype(op.dtype)).T

    return ScipyOperator(op.shape, matvec=matvec, matmat=matmat, rmatvec=matvec, dtype=_numpy_dtype(op.dtype))
