"""CUDA paths against the CPU, and GPU timings: merge methods, the streaming engine, probes, landscape paths.

Run on a machine with a GPU (`python benchmarks/device_check.py --out DIR`); every section records either
its comparison with the same computation on the CPU or the error it raised, so one run tells everything.
Writes DIR/device_check.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def section(results: dict, name: str):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - recorded, the other sections still run
            results[name] = {"error": traceback.format_exc()[-2000:]}
        results[name + "_seconds"] = round(time.perf_counter() - t0, 3)
        print(name, json.dumps(results[name])[:400], flush=True)
        return fn
    return wrap


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return {"max_abs": float((a - b).abs().max()), "rel": float((a - b).norm() / b.norm().clamp(min=1e-30)),
            "identical": bool(torch.equal(a, b))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda", help="cpu runs the same code (a dry run of this script)")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    results: dict = {"torch": torch.__version__, "device": name}

    @section(results, "methods_cpu_vs_cuda")
    def _methods():
        from merging.methods.apply import full_params, merge_tensor
        from merging.methods.catalog import get_method, registered_names

        g = torch.Generator().manual_seed(0)
        base = (torch.randn(300, 1000, generator=g) * 0.02).to(torch.bfloat16)  # > one chunk
        models = [(base.float() + 0.002 * torch.randn(300, 1000, generator=g)).to(torch.bfloat16) for _ in range(3)]
        out = {}
        for name in registered_names():
            m = get_method(name)
            info = m.info
            n = min(3, info.max_models or 3)
            raw = {p.name: 0.5 for p in info.params if p.default is None}
            if any(p.name == "density" for p in info.params):
                raw["density"] = 0.5
            b = base if info.needs_base else None
            try:
                params = full_params(m, raw, n)
                cpu = merge_tensor(m, "w", models[:n], b, params, 0, torch.float32)
                gpu = merge_tensor(m, "w", [x.to(DEV) for x in models[:n]], None if b is None else b.to(DEV),
                                   params, 0, torch.float32)
                out[name] = diff(gpu, cpu) | {"on": str(gpu.device)}
            except Exception as err:  # noqa: BLE001
                out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return out

    @section(results, "task_vectors_llama_mlp_cpu_vs_cuda")
    def _task_vectors():
        """One Llama MLP weight (5504 x 2048, bf16) of 4 fine-tunes: bf16 task vectors share few values, so
        the trim thresholds fall on heavily tied values (the counted-heavy-value branch of the cut)."""
        from merging.methods.apply import full_params, merge_tensor
        from merging.methods.catalog import get_method

        g = torch.Generator().manual_seed(2)
        base = (torch.randn(5504, 2048, generator=g) * 0.02).to(torch.bfloat16)
        models = [(base.float() + 0.0005 * torch.randn(base.shape, generator=g)).to(torch.bfloat16)
                  for _ in range(4)]
        gpu_models, gpu_base = [x.to(DEV) for x in models], base.to(DEV)
        out = {}
        for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"):
            m = get_method(name)
            raw = {"weight": 0.25} | ({} if name == "task_arithmetic" else {"density": 0.5})
            params = full_params(m, raw, 4)
            t0 = time.perf_counter()
            cpu = merge_tensor(m, "w", models, base, params, 0, torch.bfloat16)
            cpu_s = time.perf_counter() - t0
            merge_tensor(m, "w", gpu_models, gpu_base, params, 0, torch.bfloat16)  # warm-up
            sync()
            t0 = time.perf_counter()
            gpu = merge_tensor(m, "w", gpu_models, gpu_base, params, 0, torch.bfloat16)
            sync()
            out[name] = diff(gpu, cpu) | {"cpu_s": round(cpu_s, 4),
                                          "cuda_s": round(time.perf_counter() - t0, 4)}
        return out

    @section(results, "engine_ties_cpu_vs_cuda")
    def _engine():
        from safetensors.torch import load_file, save_file

        from merging import merge

        g = torch.Generator().manual_seed(1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base = {f"layers.{i}.w": torch.randn(512, 700, generator=g) for i in range(3)}
            save_file(base, tmp / "base.safetensors")
            refs = []
            for k in range(3):
                save_file({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                          tmp / f"m{k}.safetensors")
                refs.append(str(tmp / f"m{k}.safetensors"))
            out = {}
            for method in ("ties", "dare_ties", "breadcrumbs", "linear"):
                recipe = {"merge_method": method, "models": [{"model": r, "parameters": {"weight": 0.4}} for r in refs]}
                if method != "linear":
                    recipe["base_model"] = str(tmp / "base.safetensors")
                    for entry in recipe["models"]:
                        entry["parameters"]["density"] = 0.5
                merge(recipe, tmp / f"{method}-cpu", progress=False)
                t0 = time.perf_counter()
                merge(recipe, tmp / f"{method}-cuda", device=DEV, progress=False)
                seconds = time.perf_counter() - t0
                a = {}
                for f in sorted((tmp / f"{method}-cpu").glob("*.safetensors")):
                    a.update(load_file(f))
                b = {}
                for f in sorted((tmp / f"{method}-cuda").glob("*.safetensors")):
                    b.update(load_file(f))
                flat_a = torch.cat([a[n].reshape(-1) for n in sorted(a)])
                flat_b = torch.cat([b[n].reshape(-1) for n in sorted(b)])
                out[method] = {"cuda_seconds": round(seconds, 3), **diff(flat_b, flat_a)}
            return out

    def digits_mlp(widths: list[int]):
        from evaluations.digits import load_digits_all, make_mlp, train_classifier

        x, y = load_digits_all()
        model = make_mlp(widths, seed=0)
        train_classifier(model, x, y, epochs=10)
        return model, x, y

    @section(results, "hessian_cpu_vs_cuda")
    def _hessian():
        from evaluations.probes import HessianOperator, hutchinson_trace, lanczos, spectral_density

        model, x, y = digits_mlp([64, 512, 512, 10])
        loss = nn.CrossEntropyLoss()
        cpu_op = HessianOperator(model, loss, (x, y))
        ref = lanczos(cpu_op, k=5, tol=1e-6)
        gpu_model = model.to(DEV)
        op = HessianOperator(gpu_model, loss, (x.to(DEV), y.to(DEV)))
        lanczos(op, k=1)  # warm-up
        sync()
        t0 = time.perf_counter()
        top1 = lanczos(op, k=1)
        sync()
        t1 = time.perf_counter()
        top5 = lanczos(op, k=5)
        sync()
        t2 = time.perf_counter()
        trace = hutchinson_trace(op)
        density = spectral_density(op, steps=40, runs=2)
        ref_values = torch.tensor(list(ref.values), dtype=torch.float64)
        return {
            "top1_cuda_s": round(t1 - t0, 4), "top5_cuda_s": round(t2 - t1, 4),
            "top1_rel_error_vs_cpu_tight": float(abs(float(top1.values[0]) - ref_values[0]) / ref_values[0]),
            "top5_max_rel_error_vs_cpu_tight": float(((torch.tensor(list(top5.values), dtype=torch.float64)
                                                       - ref_values).abs() / ref_values.abs()).max()),
            "converged": [bool(top1.converged), bool(top5.converged), bool(trace.converged), bool(density.converged)],
            "trace": [float(trace.mean), float(trace.stderr)],
        }

    @section(results, "ntk_cuda")
    def _ntk():
        from evaluations.probes import empirical_ntk

        model, x, _ = digits_mlp([64, 512, 512, 10])
        gpu_model = model.to(DEV)
        xs = x[:256].to(DEV)
        structured = empirical_ntk(gpu_model, xs, kind="full", method="structured")
        jacobian = empirical_ntk(gpu_model, xs, kind="full", method="jacobian")
        cpu = empirical_ntk(model.cpu(), x[:256], kind="full", method="structured")
        gpu_model = model.to(DEV)
        timings = {}
        for method in ("structured", "jacobian"):
            empirical_ntk(gpu_model, xs, kind="full", method=method)
            sync()
            t0 = time.perf_counter()
            empirical_ntk(gpu_model, xs, kind="full", method=method)
            sync()
            timings[method + "_256_s"] = round(time.perf_counter() - t0, 4)
        x2048 = torch.cat([x, x[: 2048 - len(x)]]).to(DEV)
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        big = empirical_ntk(gpu_model, x2048, kind="full", method="structured")
        sync()
        timings["structured_2048_s"] = round(time.perf_counter() - t0, 3)
        if DEV == "cuda":
            timings["structured_2048_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        conv = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).to(DEV)
        images = x[:48].reshape(-1, 1, 8, 8).to(DEV)
        conv_s = empirical_ntk(conv, images, kind="full", method="structured")
        conv_j = empirical_ntk(conv, images, kind="full", method="jacobian")
        return {"mlp_structured_vs_jacobian": diff(structured, jacobian), "mlp_cuda_vs_cpu": diff(structured, cpu),
                "conv_structured_vs_jacobian": diff(conv_s, conv_j), "shape_2048": list(big.shape), **timings}

    @section(results, "landscape_path_cpu_vs_cuda")
    def _path():
        from evaluations.digits import load_digits_all, make_mlp, train_classifier
        from evaluations.landscape import evaluate_path, linear_path

        x, y = load_digits_all()
        a, b = make_mlp([64, 64, 10], seed=1), make_mlp([64, 64, 10], seed=2)
        train_classifier(a, x, y, epochs=3)
        train_classifier(b, x, y, epochs=3)
        cpu = evaluate_path(a, linear_path(a.state_dict(), b.state_dict()), (x, y), alphas=11)
        a_gpu, b_gpu = a.to(DEV), b.to(DEV)
        data = (x.to(DEV), y.to(DEV))
        gpu = evaluate_path(a_gpu, linear_path(a_gpu.state_dict(), b_gpu.state_dict()), data, alphas=11)
        loop = evaluate_path(a_gpu, linear_path(a_gpu.state_dict(), b_gpu.state_dict()), data, alphas=11,
                             batched=False)
        from evaluations.landscape import random_directions, slice_2d

        center = {k: v.clone() for k, v in a_gpu.state_dict().items()}
        d1, d2 = random_directions(center, n=2, normalize="filter", seed=0)
        surface = slice_2d(a_gpu, center, d1, d2, data, alphas=5)
        return {"loss_batched": diff(torch.tensor(gpu.loss), torch.tensor(cpu.loss)),
                "loss_loop": diff(torch.tensor(loop.loss), torch.tensor(cpu.loss)), "batched": bool(gpu.batched),
                "slice_2d_center_loss": float(surface.loss[2, 2]), "path_start_loss": float(cpu.loss[0])}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
