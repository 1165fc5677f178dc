"""Fort et al. 2020 ("Deep learning versus kernel learning") on scikit-learn's digits, in a few minutes on CPU.

(1) parent-child spawning: the error barrier between two children spawned at epoch t (Frankle's form,
    30 alphas) is large for early t and near zero after a few epochs;
(2) kernel velocity (trace NTK on a probe set) is high early, then roughly constant;
(3) NTK regression with the kernel of epoch k beats the initial kernel, approaching the network;
(4) from checkpoints at several times t: the linearized model f_lin(x) = f_t(x) + J_t(x)(w - w_t) trained on
    with SGD and cross-entropy (same schedule and momentum state as the network), the network trained on from
    the same checkpoint, and NTK regression with the kernel of t on the whole training set (Fort et al. Sec. 3,
    Fig. 5-6: the linearized model from a late enough checkpoint matches full training);
and the error barrier between every pair of tracked checkpoints.
Writes benchmarks/results/fort2020_digits.json and fort2020_digits.png.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from evaluations.digits import load_digits_split, make_mlp
from evaluations.plotting import pyplot, save_figure
from evaluations.probes.linearize import linearize, ntk_regression
from evaluations.tracking import Tracker, spawn, train_epochs
from merging.io.atomic import atomic_write_text

WIDTHS = [64, 128, 128, 10]
EPOCHS = 10
LR, MOMENTUM, BATCH = 0.2, 0.9, 32  # a large learning rate, decayed linearly to 0 at EPOCHS
NTK_TRAIN = 100  # a small kernel-regression training set, so the kernel's quality shows
SPAWN_TIMES = [0, 0.125, 0.25, 0.5, 1, 2, 3, 4, 6]
RECORD_TIMES = [0, 0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 10]
LINEARIZE_TIMES = [0, 0.5, 1, 2, 4]  # checkpoints (among RECORD_TIMES) the linearized comparison starts from


def main(out_dir: str = "benchmarks/results", seeds: int = 3) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_digits_split()
    train, test = data.train, data.test

    spawning = []
    for t in tqdm(SPAWN_TIMES, desc="spawning"):
        runs = [spawn(lambda s=s: make_mlp(WIDTHS, seed=s), train, test, t, EPOCHS, lr=LR, momentum=MOMENTUM,
                      batch_size=BATCH, seed=s, decay=True) for s in range(seeds)]
        spawning.append({"spawn_epoch": t, "barriers": [r.barrier for r in runs],
                         "child_errors": [r.child_errors for r in runs]})

    model = make_mlp(WIDTHS, seed=0)
    tracker = Tracker(probe=(test[0][:256], test[1][:256]), train=(train[0][:NTK_TRAIN], train[1][:NTK_TRAIN]),
                      test=test)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(0)
    done = 0.0
    network_error = []
    checkpoints = {}
    for t in tqdm(RECORD_TIMES, desc="tracking"):
        train_epochs(model, opt, *train, t - done, BATCH, gen, start=done, decay_to=EPOCHS)
        done = t
        tracker.record(model, t)
        with torch.no_grad():
            network_error.append(float((model(test[0]).argmax(-1) != test[1]).float().mean()))
        if t in LINEARIZE_TIMES:
            checkpoints[t] = (copy.deepcopy(model), copy.deepcopy(opt.state_dict()))

    linearized = [compare_from_checkpoint(t, *checkpoints[t], train, test)
                  for t in tqdm(LINEARIZE_TIMES, desc="linearized")]
    records = tracker.to_json()["records"]
    ntk_err = [1 - r["ntk_accuracy"] for r in records]
    result = {
        "setup": {"widths": WIDTHS, "epochs": EPOCHS, "lr": LR, "momentum": MOMENTUM, "batch_size": BATCH,
                  "lr_schedule": "linear decay to 0",
                  "seeds": seeds, "train": len(train[0]), "test": len(test[0]), "ntk_train": NTK_TRAIN,
                  "linearize_times": LINEARIZE_TIMES},
        "spawning": spawning,
        "tracking": records,
        "network_test_error": network_error,
        "ntk_test_error": ntk_err,
        "ntk_error_ratio_init_over_best_early": ntk_err[0] / max(min(ntk_err[1:6]), 1e-9),
        "ntk_error_ratio_init_over_epoch": {f"{r['epoch']:g}": ntk_err[0] / max(e, 1e-9)
                                            for r, e in zip(records, ntk_err)},
        "barrier_matrix": tracker.to_json()["barrier_matrix"],
        "linearized": linearized,
        "seconds": time.perf_counter() - start,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fort2020_digits.json", json.dumps(result, indent=2))
    plot(result, out / "fort2020_digits.png")
    return result


def test_error(model: torch.nn.Module, test) -> float:
    with torch.no_grad():
        return float((model(test[0]).argmax(-1) != test[1]).float().mean())


def compare_from_checkpoint(t: float, model: torch.nn.Module, opt_state: dict, train, test,
                            seeds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """From the checkpoint at epoch t: the network and its linearization trained on to EPOCHS with the same
    batch orders (one run per seed), learning-rate schedule and momentum state; NTK regression with the
    kernel of t on the whole training set. Test errors; the trained-on ones averaged over the seeds."""
    out: dict = {"t": t, "network_at_t": test_error(model, test), "seeds": list(seeds)}
    for name in ("network_trained_on", "linearized_trained_on"):
        errors, begin = [], time.perf_counter()
        for seed in seeds:
            module = copy.deepcopy(model) if name == "network_trained_on" else linearize(model)
            opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)
            opt.load_state_dict(copy.deepcopy(opt_state))  # same parameter order: the network's momentum buffers
            gen = torch.Generator().manual_seed(seed)
            train_epochs(module, opt, *train, EPOCHS - t, BATCH, gen, start=t, decay_to=EPOCHS)
            errors.append(test_error(module, test))
        out[name] = sum(errors) / len(errors)
        out[f"{name}_per_seed"] = errors
        out[f"{name}_seconds"] = time.perf_counter() - begin
    begin = time.perf_counter()
    out["ntk_regression_full_train"] = 1 - ntk_regression(model, *train, *test).accuracy
    out["ntk_regression_seconds"] = time.perf_counter() - begin
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.6))
    axes = axes.reshape(-1)
    sp = result["spawning"]
    ts = [max(s["spawn_epoch"], 0.03) for s in sp]
    mean = [100 * sum(s["barriers"]) / len(s["barriers"]) for s in sp]
    for k in range(len(sp[0]["barriers"])):
        axes[0].plot(ts, [100 * s["barriers"][k] for s in sp], ".", c="gray", alpha=0.6)
    axes[0].plot(ts, mean, "o-", label="mean over seeds")
    axes[0].axhline(2, ls="--", c="gray", label="stable (2%)")
    axes[0].set(xscale="log", xlabel="spawn epoch t (0 plotted at 0.03)", ylabel="error barrier (%)",
                title="children's barrier")
    axes[0].legend()
    rec = result["tracking"][1:]
    axes[1].plot([r["epoch"] for r in rec], [r["kernel_velocity"] for r in rec], "o-")
    axes[1].set(xlabel="epoch", ylabel="kernel velocity (1/epoch)", yscale="log", title="kernel velocity")
    epochs = [r["epoch"] for r in result["tracking"]]
    setup = result["setup"]
    axes[2].plot(epochs, [100 * e for e in result["ntk_test_error"]], "o-",
                 label=f"NTK regression on {setup['ntk_train']} examples, kernel at t")
    axes[2].plot(epochs, [100 * e for e in result["network_test_error"]], "s-",
                 label=f"network at t (trained on {setup['train']})")
    axes[2].set(xlabel="epoch t", ylabel="test error (%)", yscale="log", title="kernel performance")
    axes[2].legend(fontsize=8)
    lin = result["linearized"]
    lt = [r["t"] for r in lin]
    for key, label, marker in (("network_trained_on", "network trained on from t", "s-"),
                               ("linearized_trained_on", "linearized at t, trained on", "o-"),
                               ("ntk_regression_full_train", f"NTK regression, kernel at t ({setup['train']})", "^-")):
        line = axes[3].plot(lt, [100 * r[key] for r in lin], marker, label=label)[0]
        for r in lin:
            per_seed = r.get(f"{key}_per_seed", [])
            axes[3].plot([r["t"]] * len(per_seed), [100 * e for e in per_seed], ".", c=line.get_color(), alpha=0.5)
    axes[3].set(xlabel="checkpoint epoch t", ylabel="final test error (%)",
                title="from a checkpoint at t (mean of seeds, dots: seeds)")
    axes[3].legend(fontsize=8)
    bm = result["barrier_matrix"]
    grid = [[float("nan") if v is None else 100 * v for v in row] for row in bm["barriers"]]
    im = axes[4].imshow(grid, cmap="viridis")
    labels = [f"{e:g}" for e in bm["epochs"]]
    axes[4].set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axes[4].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[4].set(xlabel="checkpoint epoch", ylabel="checkpoint epoch", title="error barrier between checkpoints (%)")
    fig.colorbar(im, ax=axes[4])
    axes[5].plot(epochs, [r["top_eigenvalue"] for r in result["tracking"]], "o-")
    axes[5].set(xlabel="epoch", ylabel="top Hessian eigenvalue (probe set)", title="sharpness")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    res = main()
    keys = ("ntk_test_error", "network_test_error", "ntk_error_ratio_init_over_best_early", "linearized", "seconds")
    print(json.dumps({k: res[k] for k in keys}, indent=2))
    for s in res["spawning"]:
        print(f"spawn t={s['spawn_epoch']:<6} barrier={[round(b, 4) for b in s['barriers']]}")
