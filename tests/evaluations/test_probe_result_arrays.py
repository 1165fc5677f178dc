"""Probe results hold numpy float64 arrays (`evaluations.results`), and their numbers did not change when they
stopped holding tensors: every result type's JSON (and the derived values and eigenvectors) on fixed seeded inputs
against `data/probe_results.json`, recorded from the tensor-holding code (commit 1374c72) by `python -m
tests.evaluations.test_probe_result_arrays` on an AVX-512 CPU. On a CPU of the same kind whose Lanczos run
reproduces the recording bit for bit, every number must; elsewhere another CPU's BLAS/LAPACK/reduction last bits are
allowed (1e-12 relative). Ritz residuals and error bounds are round-off-sized norms (1e-13 on an eigenvalue of 30)
whose last bits follow the order of the residual arithmetic, which the Lanczos bookkeeping of issue 21 changed: they
are held to 64 float64 epsilons of the result's largest eigenvalue instead."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evaluations.probes import (
    DenseOperator,
    GGNOperator,
    adaptive_sharpness,
    diagonal,
    empirical_ntk,
    empirical_ntk_result,
    epsilon_sharpness,
    hutchinson_diagonal,
    hutchinson_trace,
    kernel_alignment,
    kernel_distance,
    lanczos,
    power_iteration,
    spectral_density,
    top_to_trace_ratio,
    xtrace,
)

FIXTURE = Path(__file__).parent / "data" / "probe_results.json"
RECORDED_ON = "AVX512"  # torch.backends.cpu.get_cpu_capability() of the recording machine
FIXTURE_SHA256 = "882cdffbdf34f19ce3ecc3a91e4652759a1c100814b5fde9f3f42b5c604057f4"


def _matrix(n: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([30.0, 18.0, 9.0]), torch.randn(n - 3, generator=gen, dtype=torch.float64)])
    return (q * ev) @ q.T


def _model(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (6,), generator=gen)
    return model, x, y


def results() -> dict[str, tuple[object, dict]]:
    """name -> (result, derived values not in its JSON), every probe result type on small seeded inputs."""
    a = _matrix()
    a64, a32 = DenseOperator(a), DenseOperator(a.float())
    out: dict[str, tuple[object, dict]] = {}
    for name, eig in [("lanczos64", lanczos(a64, k=3, tol=1e-8)), ("lanczos32", lanczos(a32, k=2, tol=1e-4)),
                      ("power", power_iteration(a64, k=2, tol=1e-8, max_iter=500))]:
        out[name] = (eig, {"vectors": _floats(eig.vectors)})
    for name, est in [("hutchinson", hutchinson_trace(a64, seed=1)), ("xtrace", xtrace(a64, matvecs=12, seed=2))]:
        out[name] = (est, {"ci95": list(est.ci95), "iterations": est.iterations})
    dens = spectral_density(a64, steps=20, runs=12, points=40, seed=3)  # sums over 240 nodes: torch's summation order
    out["density"] = (dens, {"mass": dens.mass(-1.0, 1.0), **{f"moment{p}": dens.moment(p) for p in (1, 2, 3, 4)}})
    for name, op in [("diagonal64", a64), ("diagonal32", a32)]:
        est = hutchinson_diagonal(op, max_samples=50, seed=4)
        out[name] = (est, {"error": est.error})
    model, x, y = _model(torch.float64)
    exact = diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (x, y)), method="exact")
    out["diagonal_exact"] = (exact, {"error": exact.error})
    for dtype in (torch.float64, torch.float32):
        model, x, y = _model(dtype)
        for kind, method in [("full", "jacobian"), ("trace", "structured"), ("block", "ntk_vp")]:
            res = empirical_ntk_result(model, x, kind=kind, method=method)
            out[f"ntk_{kind}_{str(dtype)[6:]}"] = (res, {"kernel": res.to_json(kernel=True)["kernel"]})
    model, x, y = _model(torch.float64)
    out["epsilon"] = (epsilon_sharpness(model, nn.CrossEntropyLoss(), (x, y), steps=3), {})
    out["adaptive"] = (adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), steps=2), {})
    out["ratio"] = (top_to_trace_ratio(a64), {})
    return out


def _floats(values) -> list:
    return [[float(v) for v in row] for row in values]


def _record() -> dict:
    return {name: {"json": r.to_json() if hasattr(r, "to_json") else r, "derived": derived}
            for name, (r, derived) in results().items()}


ROUND_OFF_NORMS = ("residuals", "error_bounds")


def _close(got, want, path: str = "", rtol: float = 1e-12, atol: float = 0.0) -> None:
    """Equal structure and non-float values; floats within `rtol` relative (0: bit for bit) or `atol`; the
    round-off-sized norms beside a result's `values` within 64 float64 epsilons of its largest |value|."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        values = want.get("values")
        scale = max((abs(v) for v in values if isinstance(v, float)), default=0.0) if isinstance(values, list) else 0
        for key in want:
            norm_atol = 64 * np.finfo(np.float64).eps * scale if key in ROUND_OFF_NORMS else atol
            norm_rtol = max(rtol, 1e-2) if rtol and key in ROUND_OFF_NORMS else rtol  # another CPU: round-off itself
            _close(got[key], want[key], f"{path}.{key}", norm_rtol, norm_atol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]", rtol, atol)
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float), f"{path}: {got!r} is not a float"
        assert got == want or (math.isfinite(want) and abs(got - want) <= max(rtol * max(abs(want), 1e-300), atol)), \
            f"{path}: {got!r} != {want!r}"
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


def _tensors(value) -> list[str]:
    """Where a tensor hides in a result's fields (dicts and sequences searched)."""
    if isinstance(value, torch.Tensor):
        return ["tensor"]
    if isinstance(value, dict):
        return [f"{k}.{t}" for k, v in value.items() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [f"[{i}].{t}" for i, v in enumerate(value) for t in _tensors(v)]
    return []


def test_the_fixture_is_the_recorded_one():
    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == FIXTURE_SHA256


def test_every_probe_result_holds_numpy_float64_arrays_and_its_json_is_unchanged():
    want = json.loads(FIXTURE.read_text())
    built = results()
    assert list(built) == list(want)
    got = {name: {"json": r.to_json() if hasattr(r, "to_json") else r, "derived": derived}
           for name, (r, derived) in built.items()}
    got = json.loads(json.dumps(got))
    same_cpu = torch.backends.cpu.get_cpu_capability() == RECORDED_ON and got["lanczos64"] == want["lanczos64"]
    _close(got, want, rtol=0.0 if same_cpu else 1e-4, atol=0.0 if same_cpu else 1e-12)  # another CPU: rounding
    arrays = 0
    for name, (result, _) in built.items():
        if not dataclasses.is_dataclass(result):
            continue
        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            assert not _tensors(value), f"{name}.{f.name} holds a tensor"
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float64, f"{name}.{f.name}: {value.dtype}"
                arrays += 1
    assert arrays == 3 * 3 + 5 + 2 * 3 + 6  # Eigen x3, Density, DiagonalEstimate x3, NTKResult x6


def test_tensor_apis_keep_their_tensors():
    """`empirical_ntk` is the kernel as a tensor in the model's dtype, the kernel `NTKResult` holds as float64; the
    kernel comparisons give the same bits for either."""
    for dtype in (torch.float32, torch.float64):
        model, x, y = _model(dtype)
        k = empirical_ntk(model, x, kind="trace")
        res = empirical_ntk_result(model, x, kind="trace")
        assert isinstance(k, torch.Tensor) and k.dtype == dtype
        assert np.array_equal(res.kernel, k.double().numpy())
        moved = _model(dtype)[0]
        with torch.no_grad():
            for p in moved.parameters():
                p.mul_(1.5).add_(0.1)
        k0 = empirical_ntk(moved, x, kind="trace")
        assert kernel_distance(k0, k) > 0
        assert kernel_distance(k0.double().numpy(), res.kernel) == kernel_distance(k0, k)
        assert kernel_alignment(res.kernel, y, num_classes=3) == kernel_alignment(k, y, num_classes=3)


if __name__ == "__main__":  # records the fixture (from the code before the change)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(_record(), indent=1) + "\n")
    print(FIXTURE, hashlib.sha256(FIXTURE.read_bytes()).hexdigest())
