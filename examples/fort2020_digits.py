"""Fort et al. 2020 ("Deep learning versus kernel learning") on scikit-learn's digits, in a few minutes on CPU.

(1) parent-child spawning: the error barrier between two children spawned at epoch t (Frankle's form,
    30 alphas) is large for early t and near zero after a few epochs;
(2) kernel velocity (trace NTK on a probe set) is high early, then roughly constant;
(3) NTK regression with the kernel of epoch k beats the initial kernel, approaching the network.
Writes benchmarks/results/fort2020_digits.json and fort2020_digits.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from evaluations.digits import load_digits_split, make_mlp
from evaluations.tracking import Tracker, spawn, train_epochs

WIDTHS = [64, 128, 128, 10]
EPOCHS = 10
LR, MOMENTUM, BATCH = 0.2, 0.9, 32  # a large learning rate, decayed linearly to 0 at EPOCHS
NTK_TRAIN = 100  # a small kernel-regression training set, so the kernel's quality shows
SPAWN_TIMES = [0, 0.125, 0.25, 0.5, 1, 2, 3, 4, 6]
RECORD_TIMES = [0, 0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 10]


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
    for t in tqdm(RECORD_TIMES, desc="tracking"):
        train_epochs(model, opt, *train, t - done, BATCH, gen, start=done, decay_to=EPOCHS)
        done = t
        tracker.record(model, t)
        with torch.no_grad():
            network_error.append(float((model(test[0]).argmax(-1) != test[1]).float().mean()))

    records = tracker.to_json()["records"]
    ntk_err = [1 - r["ntk_accuracy"] for r in records]
    result = {
        "setup": {"widths": WIDTHS, "epochs": EPOCHS, "lr": LR, "momentum": MOMENTUM, "batch_size": BATCH,
                  "lr_schedule": "linear decay to 0",
                  "seeds": seeds, "train": len(train[0]), "test": len(test[0]), "ntk_train": NTK_TRAIN},
        "spawning": spawning,
        "tracking": records,
        "network_test_error": network_error,
        "ntk_test_error": ntk_err,
        "ntk_error_ratio_init_over_best_early": ntk_err[0] / max(min(ntk_err[1:6]), 1e-9),
        "seconds": time.perf_counter() - start,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fort2020_digits.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "fort2020_digits.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sp = result["spawning"]
    ts = [max(s["spawn_epoch"], 0.03) for s in sp]
    mean = [100 * sum(s["barriers"]) / len(s["barriers"]) for s in sp]
    axes[0].plot(ts, mean, "o-")
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
    axes[2].set(xlabel="epoch t", ylabel="test error (%)", title="kernel performance")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    res = main()
    keys = ("ntk_test_error", "network_test_error", "ntk_error_ratio_init_over_best_early", "seconds")
    print(json.dumps({k: res[k] for k in keys}, indent=2))
    for s in res["spawning"]:
        print(f"spawn t={s['spawn_epoch']:<6} barrier={[round(b, 4) for b in s['barriers']]}")
