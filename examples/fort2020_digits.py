"""Fort et al. 2020 ("Deep learning versus kernel learning", NeurIPS 2020) on digit pairs, in minutes on CPU.

The paper's three headline curves, over several seeds:
(1) parent-child spawning: the error barrier (Frankle's form, 30 alphas) between two children spawned from
    one parent at epoch t and trained on with different batch orders: large during an early chaotic
    transient, near zero after it;
(2) kernel velocity v(t) = S(K_t, K_t+dt) / dt, S = 1 - <K1, K2>_F / (|K1|_F |K2|_F) (the paper's eqs. 3-4),
    of the output-traced empirical NTK on a fixed probe set: high early, then (at a constant learning rate)
    roughly constant;
(3) kernel regression (ridge, one-hot targets) with the empirical NTK of epoch t, beside the network at t:
    the data-dependent kernel beats the initial one (the abstract: "by a factor of 3 in less than 3 to 4
    epochs"); `ratio_init_over_epoch3` is initial-kernel error / kernel-at-epoch-3 error with a
    hierarchical bootstrap CI (seeds, then paired test examples).

Task ("pairs"): two digits side by side (8x16 pixels), label = (left + right) mod 10, composites drawn from
scikit-learn's digits (the test composites only from the held-out digits). On single digits the initial
kernel is already near the network (the raw-pixel kernel is strong there); on pairs the label is a
function of both digits' classes, which the initial kernel cannot read off the pixels. A small CNN (two 3x3
convolutions, a one-hidden-layer head; 34,730 parameters) trained by SGD with momentum at a constant learning
rate (the paper's constant phase); its empirical NTK by basin's structured rule for Conv2d and Linear layers.

Ablations (same seeds and sizes): "linear_decay" (the learning rate decays linearly to 0, the schedule of
the earlier version of this example) for the velocity curve; "single_digits" (the raw digits task) and
"mlp" (a ReLU MLP 128-256-256-10 instead of the CNN, no spawning) for the kernel gain.

    python examples/fort2020_digits.py           # main setup + both ablations, 3 seeds, minutes on 2 cores
    python examples/fort2020_digits.py --full    # 5 seeds, longer training, the linearized comparison
    python examples/fort2020_digits.py --quick   # seconds (smoke test)

Writes fort2020_digits.json and fort2020_digits.png into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluations.digits import load_digits_split, make_mlp
from evaluations.plotting import optional_pyplot, save_figure
from evaluations.probes.linearize import kernel_ridge_predict, linearize
from evaluations.probes.ntk import empirical_ntk
from evaluations.tracking import Tracker, spawn, train_epochs
from merging.io.atomic import atomic_write_text

DEFAULT_OUT = Path("benchmarks/results")
CLASSES = 10
PAPER = {
    "source": "Fort, Dziugaite, Paul, Kharaghani, Roy, Ganguli, NeurIPS 2020 (arXiv 2010.15110), abstract",
    "chaotic_transient_epochs": [2, 3],
    "kernel_gain_over_initial": 3.0,
    "kernel_gain_reached_by_epoch": [3, 4],
    "velocity_after_transient": "constant",
    "kernel_matches_network_at_fraction_of_training": [0.15, 0.45],
}


@dataclass(frozen=True)
class Setup:
    task: str = "pairs"  # "pairs": (left + right) mod 10 of two digits; "digits": single digits
    schedule: str = "constant"  # "constant" or "linear" (decay to 0 at `epochs`)
    epochs: float = 10
    lr: float = 0.05
    momentum: float = 0.9
    batch: int = 32
    arch: str = "cnn"  # "cnn" (the paper's kind of network) or "mlp" (the ablation)
    channels: int = 16  # CNN: conv 3x3 (channels/2) -> ReLU -> conv 3x3 stride 2 (channels) -> ReLU -> linear
    hidden: int = 64  # the CNN head's hidden width; the MLP's: in-hidden-hidden-10
    n_train: int = 4000  # composites (pairs) drawn from the 1,348 training digits; all digits for "digits"
    n_test: int = 1000
    kernel_train: int = 1000  # kernel-regression training set: the first examples of the training set
    kernel_test: int = 500
    probe: int = 256  # kernel velocity's probe set: the first test examples
    seeds: int = 3
    record_times: tuple[float, ...] = (0, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 10)
    spawn_times: tuple[float, ...] = (0, 0.25, 0.5, 1, 2, 3, 5)
    spawning: bool = True
    linearized_times: tuple[float, ...] = ()  # checkpoints the linearized comparison starts from (--full)


# ---- data and model ---------------------------------------------------------------------------------------


def _pairs(x: torch.Tensor, y: torch.Tensor, n: int, rng: np.random.Generator):
    """n composites: digits a and b side by side ([n, 128] = 8x16 pixels), label (y_a + y_b) mod 10."""
    a = torch.from_numpy(rng.integers(0, len(x), n))
    b = torch.from_numpy(rng.integers(0, len(x), n))
    images = torch.cat([x[a].reshape(n, 8, 8), x[b].reshape(n, 8, 8)], dim=2)
    return images.reshape(n, 128).contiguous(), (y[a] + y[b]) % CLASSES


def make_task(setup: Setup):
    """(train, test) for the setup's task; fixed across seeds (the data seed is 0)."""
    split = load_digits_split()
    if setup.task == "digits":
        return split.train, split.test
    rng = np.random.default_rng(0)
    return _pairs(*split.train, setup.n_train, rng), _pairs(*split.test, setup.n_test, rng)


def make_cnn(in_features: int, channels: int, hidden: int, seed: int) -> torch.nn.Sequential:
    """A small CNN on 8-row images given flat ([n, 8 * width]): conv 3x3 (channels / 2, padding 1), ReLU,
    conv 3x3 (channels, stride 2, padding 1), ReLU, then a one-hidden-layer head (flattened [channels, 4,
    width / 2] -> hidden -> ReLU -> 10; a linear head cannot read (a + b) mod 10 off per-digit features)."""
    torch.manual_seed(seed)
    width = in_features // 8
    half = max(1, channels // 2)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, width)),
        torch.nn.Conv2d(1, half, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(half, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(channels * 4 * ((width + 1) // 2), hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, CLASSES))


def make_model(setup: Setup, in_features: int, seed: int) -> torch.nn.Module:
    if setup.arch == "mlp":
        return make_mlp([in_features, setup.hidden, setup.hidden, CLASSES], seed=seed)
    return make_cnn(in_features, setup.channels, setup.hidden, seed)


def _decay(setup: Setup) -> float | None:
    return setup.epochs if setup.schedule == "linear" else None


# ---- measurements -----------------------------------------------------------------------------------------


def kernel_regression_wrong(model: torch.nn.Module, train, test) -> torch.Tensor:
    """Per test example, whether kernel ridge regression with `model`'s trace NTK (ridge 1e-3 mean diag) errs."""
    (xtr, ytr), (xte, yte) = train, test
    k_train = empirical_ntk(model, xtr, kind="trace")
    k_test = empirical_ntk(model, xte, xtr, kind="trace")
    return kernel_ridge_predict(k_train, ytr, k_test, CLASSES).argmax(1) != yte


def network_wrong(model: torch.nn.Module, test) -> torch.Tensor:
    with torch.no_grad():
        return model(test[0]).argmax(-1) != test[1]


def track(setup: Setup, train, test, seed: int) -> dict:
    """One training run at the setup's schedule; at each record time: kernel velocity on the probe set,
    kernel-regression and network errors (per test example: the bootstrap resamples them)."""
    model = make_model(setup, train[0].shape[1], seed)
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum)
    gen = torch.Generator().manual_seed(seed)
    tracker = Tracker(probe=(test[0][:setup.probe], test[1][:setup.probe]), hessian=False, barriers=False)
    kr_train = (train[0][:setup.kernel_train], train[1][:setup.kernel_train])
    kr_test = (test[0][:setup.kernel_test], test[1][:setup.kernel_test])
    out: dict = {"seed": seed, "kernel_wrong": [], "network_wrong": [], "checkpoints": {}}
    done = 0.0
    for t in setup.record_times:
        train_epochs(model, opt, *train, t - done, setup.batch, gen, start=done, decay_to=_decay(setup))
        done = t
        tracker.record(model, t)
        out["kernel_wrong"].append(kernel_regression_wrong(model, kr_train, kr_test))
        out["network_wrong"].append(network_wrong(model, kr_test))
        if t in setup.linearized_times:
            out["checkpoints"][t] = (copy.deepcopy(model), copy.deepcopy(opt.state_dict()))
    out["records"] = tracker.to_json()["records"]
    return out


def spawn_barriers(setup: Setup, train, test, seed: int) -> list[float]:
    """The children's error barrier (on the test set) for each spawn time."""
    make = lambda: make_model(setup, train[0].shape[1], seed)  # noqa: E731
    return [spawn(make, train, test, t, setup.epochs, lr=setup.lr, momentum=setup.momentum,
                  batch_size=setup.batch, seed=seed, decay=setup.schedule == "linear").barrier
            for t in setup.spawn_times]


def ratio_ci(numer: list[torch.Tensor], denom: list[torch.Tensor], boots: int = 2000, seed: int = 0) -> dict:
    """sum(numer) / sum(denom) (error counts; one bool vector per seed, paired test examples) and its 95%
    percentile CI from a hierarchical bootstrap: resample seeds, then test examples within each seed.
    Bootstrap samples with no error in `denom` are dropped and counted."""
    rng = np.random.default_rng(seed)
    a = np.stack([v.numpy() for v in numer]).astype(np.int64)
    b = np.stack([v.numpy() for v in denom]).astype(np.int64)
    point = float(a.sum() / b.sum()) if b.sum() else None
    seeds, n = a.shape
    ratios, dropped = [], 0
    for _ in range(boots):
        s = rng.integers(0, seeds, seeds)[:, None]
        idx = rng.integers(0, n, (seeds, n))
        num, den = a[s, idx].sum(), b[s, idx].sum()
        if den == 0:
            dropped += 1
            continue
        ratios.append(num / den)
    lo, hi = (np.percentile(ratios, [2.5, 97.5]).tolist() if ratios else (None, None))
    return {"ratio": point, "ci95": [lo, hi], "boots": boots, "dropped": dropped,
            "per_seed": [float(x.sum() / y.sum()) if y.sum() else None for x, y in zip(a, b)]}


def velocity_slope(epochs: list[float], velocity: list[float], after: float = 2.0) -> float | None:
    """Least-squares slope of log v against log t over records with t >= after (0: constant velocity)."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(epochs, velocity) if t >= after and v and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


# ---- aggregation ------------------------------------------------------------------------------------------


def _spread(rows: list[list[float]]) -> dict:
    arr = np.asarray(rows, dtype=np.float64)
    return {"mean": arr.mean(0).tolist(), "std": arr.std(0, ddof=1).tolist() if len(arr) > 1 else [0.0] * arr.shape[1],
            "per_seed": arr.tolist()}


def _error_rates(runs: list[dict], key: str) -> dict:
    return _spread([[float(w.double().mean()) for w in r[key]] for r in runs])


def _ratio_at(setup: Setup, runs: list[dict], epoch: float) -> dict | None:
    times = list(setup.record_times)
    if epoch not in times:
        return None
    i = times.index(epoch)
    out = ratio_ci([r["kernel_wrong"][0] for r in runs], [r["kernel_wrong"][i] for r in runs])
    out["epoch"] = epoch
    return out


def summarise(setup: Setup, runs: list[dict], barriers: list[list[float]]) -> dict:
    """The three curves with seed spread, the epoch-3 ratio with its CI, and the velocity's late slope."""
    epochs = list(setup.record_times)
    velocity = _spread([[r["kernel_velocity"] or 0.0 for r in run["records"][1:]] for run in runs])
    kernel = _error_rates(runs, "kernel_wrong")
    gain = [[row[0] / max(k, 1e-12) for k in row] for row in kernel["per_seed"]]
    result = {
        "setup": asdict(setup),
        "velocity": {"epochs": epochs[1:], **velocity,
                     "late_log_slope": velocity_slope(epochs[1:], velocity["mean"], setup.epochs / 2),
                     "late_log_slope_per_seed": [velocity_slope(epochs[1:], v, setup.epochs / 2)
                                                 for v in velocity["per_seed"]]},
        "kernel_regression_error": {"epochs": epochs, **kernel},
        "network_error": {"epochs": epochs, **_error_rates(runs, "network_wrong")},
        "kernel_gain_over_initial": {"epochs": epochs, **_spread(gain)},
        "ratio_init_over_epoch3": _ratio_at(setup, runs, 3),
        "kernel_from_init": _spread([[r["kernel_from_init"] for r in run["records"]] for run in runs]),
    }
    if barriers:
        result["spawning"] = {"spawn_epochs": list(setup.spawn_times), **_spread(barriers)}
    return result


def seed_run(setup: Setup, seed: int) -> tuple[dict, list[float], list[dict]]:
    """One seed of one setup: (tracked run, spawn barriers, linearized comparisons); a pool job."""
    torch.set_num_threads(1)
    train, test = make_task(setup)
    tracked = track(setup, train, test, seed)
    barriers = spawn_barriers(setup, train, test, seed) if setup.spawning else []
    linear = [compare_from_checkpoint(setup, t, *tracked["checkpoints"][t], train, test)
              for t in setup.linearized_times] if seed == 0 else []
    tracked["checkpoints"] = {}
    return tracked, barriers, linear


def run_all(named: dict[str, Setup], jobs: int, quiet: bool) -> tuple[dict, list[dict]]:
    """Every seed of every setup, over `jobs` processes (each job seeds itself: the results do not depend on
    `jobs`); ({name: summary}, the main setup's linearized comparisons)."""
    tasks = [(name, setup, seed) for name, setup in named.items() for seed in range(setup.seeds)]
    bar = tqdm(total=len(tasks), desc="runs", disable=quiet)
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(seed_run, setup, seed) for _, setup, seed in tasks]
            outputs = []
            for f in futures:
                outputs.append(f.result())
                bar.update()
    else:
        outputs = []
        for _, setup, seed in tasks:
            outputs.append(seed_run(setup, seed))
            bar.update()
    bar.close()
    summaries, linearized = {}, []
    for name, setup in named.items():
        mine = [out for (n, _, _), out in zip(tasks, outputs) if n == name]
        summaries[name] = summarise(setup, [m[0] for m in mine], [m[1] for m in mine if m[1]])
        linearized += [row for m in mine for row in m[2]]
    return summaries, linearized


# ---- the linearized comparison (--full) -------------------------------------------------------------------


def compare_from_checkpoint(setup: Setup, t: float, model, opt_state: dict, train, test) -> dict:
    """From the checkpoint at epoch t (seed 0): the network and its linearization f_t + J_t (w - w_t) trained on
    to the end with the same batch order, schedule and momentum state (Fort et al. Sec. 3); test errors."""
    out: dict = {"t": t, "network_at_t": float(network_wrong(model, test).double().mean())}
    for name in ("network_trained_on", "linearized_trained_on"):
        module = copy.deepcopy(model) if name == "network_trained_on" else linearize(model)
        opt = torch.optim.SGD(module.parameters(), lr=setup.lr, momentum=setup.momentum)
        opt.load_state_dict(copy.deepcopy(opt_state))  # same parameter order: the network's momentum buffers
        gen = torch.Generator().manual_seed(1)
        train_epochs(module, opt, *train, setup.epochs - t, setup.batch, gen, start=t, decay_to=_decay(setup))
        out[name] = float(network_wrong(module, test).double().mean())
    return out


# ---- figure -----------------------------------------------------------------------------------------------


def _band(ax, x, block: dict, label: str, marker: str, scale: float = 1.0) -> None:
    mean, std = np.asarray(block["mean"]) * scale, np.asarray(block["std"]) * scale
    line = ax.plot(x, mean, marker, label=label)[0]
    ax.fill_between(x, np.maximum(mean - std, 1e-9), mean + std, color=line.get_color(), alpha=0.2)


def plot(result: dict, path: Path) -> Path | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    main, ab = result["main"], result["ablations"]
    for name, res in (("constant LR", main), ("linear decay", ab.get("linear_decay"))):
        if res and "spawning" in res:
            x = [max(t, 0.1) for t in res["spawning"]["spawn_epochs"]]
            _band(axes[0], x, res["spawning"], name, "o-", 100)
        if res:
            _band(axes[1], res["velocity"]["epochs"], res["velocity"], name, "o-")
    axes[0].set(xscale="log", xlabel="spawn epoch t (0 at 0.1)", ylabel="children's error barrier (%)",
                title="(1) parent-child spawning")
    axes[1].set(xscale="log", yscale="log", xlabel="epoch", ylabel="kernel velocity (1/epoch)",
                title="(2) kernel velocity")
    ep = main["kernel_regression_error"]["epochs"]
    _band(axes[2], ep, main["kernel_regression_error"], "kernel regression, NTK of epoch t", "o-", 100)
    _band(axes[2], ep, main["network_error"], "network at epoch t", "s-", 100)
    axes[2].set(xlabel="epoch t", ylabel="test error (%)", title="(3) kernel at t vs network (pairs)")
    for name, res in (("pairs", main), ("single digits", ab.get("single_digits"))):
        if res:
            _band(axes[3], res["kernel_gain_over_initial"]["epochs"], res["kernel_gain_over_initial"], name, "o-")
    axes[3].axhline(PAPER["kernel_gain_over_initial"], ls="--", c="gray", label="paper: 3x")
    axes[3].set(xlabel="epoch t", ylabel="initial-kernel error / kernel-at-t error", title="kernel gain")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


# ---- entry point ------------------------------------------------------------------------------------------


def setups(args: argparse.Namespace) -> Setup:
    if args.quick:
        return Setup(epochs=3, n_train=400, n_test=200, kernel_train=150, kernel_test=100, probe=64, seeds=2,
                     channels=4, hidden=16, record_times=(0, 1, 3), spawn_times=(0, 2))
    if args.full:
        return Setup(epochs=20, seeds=5, record_times=(0, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20),
                     spawn_times=(0, 0.25, 0.5, 1, 2, 3, 5, 8), linearized_times=(0, 1, 3, 6))
    return Setup()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--full", action="store_true", help="5 seeds, 20 epochs, the linearized comparison")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=2, help="processes (one torch thread each; results do not depend on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    setup = setups(args)
    named = {"main": setup, "linear_decay": replace(setup, schedule="linear", linearized_times=()),
             "single_digits": replace(setup, task="digits", spawning=False, linearized_times=()),
             "mlp": replace(setup, arch="mlp", hidden=4 * setup.hidden, spawning=False, linearized_times=())}
    summaries, linearized = run_all(named, args.jobs, args.quiet)
    result = {"paper": PAPER, "main": summaries.pop("main"), "ablations": summaries, "linearized": linearized,
              "jobs": args.jobs, "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "fort2020_digits.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "fort2020_digits.md", to_markdown(result))
    plot(result, args.out / "fort2020_digits.png")
    if not args.quiet:
        print(json.dumps(headline(result), indent=1))
    return result


def _fmt_ratio(r: dict | None) -> str:
    if not r or r["ratio"] is None:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{r['ratio']:.2f}x (95% CI {lo:.2f}-{hi:.2f})" if lo is not None else f"{r['ratio']:.2f}x"


def _fmt_barriers(res: dict) -> str:
    sp = res.get("spawning")
    if not sp:
        return "n/a"
    rows = zip(sp["spawn_epochs"], sp["mean"], sp["std"])
    return ", ".join(f"t={t:g}: {100 * m:.1f}+-{100 * s:.1f}%" for t, m, s in rows)


def _fmt_slope(res: dict) -> str:
    v = res["velocity"]
    per_seed = ", ".join("n/a" if x is None else f"{x:+.2f}" for x in v["late_log_slope_per_seed"])
    return "n/a" if v["late_log_slope"] is None else f"{v['late_log_slope']:+.2f} (seeds: {per_seed})"


def to_markdown(result: dict) -> str:
    """The comparison table beside the paper's numbers (written next to the JSON)."""
    main, ab = result["main"], result["ablations"]
    dec, dig = ab["linear_decay"], ab["single_digits"]
    rows = [
        ("children's error barrier vs spawn epoch (mean+-sd over seeds)", "large for t < 2-3 epochs, ~0 after",
         _fmt_barriers(main), _fmt_barriers(dec)),
        ("kernel velocity after the transient: slope of log v vs log t, second half of training", "constant (slope 0)",
         _fmt_slope(main), _fmt_slope(dec)),
        ("initial-kernel error / kernel-at-epoch-3 error", "~3x (by epoch 3-4)",
         _fmt_ratio(main["ratio_init_over_epoch3"]), _fmt_ratio(dig["ratio_init_over_epoch3"])),
        ("the same ratio, MLP instead of the CNN (pairs, constant LR)", "~3x",
         _fmt_ratio(main["ratio_init_over_epoch3"]), _fmt_ratio(ab["mlp"]["ratio_init_over_epoch3"])),
    ]
    lines = ["| quantity | paper | ours: CNN, pairs, constant LR | ablation (linear decay; single digits; MLP) |",
             "|---|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]) + "\n"


def headline(result: dict) -> dict:
    """The numbers the README quotes."""
    main, ab = result["main"], result["ablations"]
    return {"ratio_init_over_epoch3": main["ratio_init_over_epoch3"],
            "ratio_init_over_epoch3_single_digits": ab["single_digits"]["ratio_init_over_epoch3"],
            "ratio_init_over_epoch3_mlp": ab["mlp"]["ratio_init_over_epoch3"],
            "velocity_late_log_slope": {"constant": main["velocity"]["late_log_slope"],
                                        "linear_decay": ab["linear_decay"]["velocity"]["late_log_slope"]},
            "spawn_barrier_mean": main.get("spawning", {}).get("mean"), "seconds": result["seconds"]}


if __name__ == "__main__":
    main()
