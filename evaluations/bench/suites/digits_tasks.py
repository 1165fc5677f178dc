"""Built-in suite `digits-tasks`: one network pretrained on scikit-learn's digits, fine-tuned on five
derived tasks, merged by a grid of methods. Offline, CPU, a few seconds of training.

Protocol (as for CLIP in Ilharco et al. 2023 and FusionBench, scaled down): the body (two ReLU
layers) is pretrained with a 10-way head on the digits; each task gets its own head, fitted as a
linear probe on the frozen pretrained body (the analogue of CLIP's zero-shot head); then the body
is fine-tuned with that head frozen. Merges combine bodies only; every task is evaluated through
its own head. The training data is the first 80% of `load_digits_split()`'s training split, the
validation split (hyperparameter selection) its last 20%, the test split the held-out 25%; the split
is fixed (`split_seed`), while `seed` drives all training (pretraining, probes, fine-tunes), so
`basin bench digits-tasks --seeds 0 1 2` reports each row's mean and spread over three trainings.

Tasks: rot90 (images rotated by 90 degrees), flip (mirrored left-right), invert (negated pixels),
permute (one fixed pixel permutation), parity (transposed images, label = digit mod 2).
Models are trained once and cached as safetensors under `cache_dir/<hash of the config>/`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from evaluations.bench.grid import MethodEntry, MethodGrid
from evaluations.bench.harness import Suite
from evaluations.bench.pools import ModelPool, Task, TaskPool
from evaluations.bench.suites.cache import prepare_cached, save_fine_tune
from evaluations.digits import load_digits_split, train_classifier

TASKS = ("rot90", "flip", "invert", "permute", "parity")
DEFAULT_CACHE = Path("~/.cache/basin/digits-tasks")


@dataclass(frozen=True)
class DigitsConfig:
    width: int = 128
    pretrain_epochs: int = 40
    probe_epochs: int = 30
    finetune_epochs: int = 15
    lr: float = 1e-3
    val_fraction: float = 0.2
    merge_sample: int = 256  # training examples per task given to Fisher and RegMean
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    version: int = 1
    split_seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def make_body(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


def transform(task: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's inputs and labels from digits `x` [n, 64], `y` [n]."""
    img = x.reshape(-1, 8, 8)
    if task == "rot90":
        return torch.rot90(img, 1, (1, 2)).reshape(-1, 64).contiguous(), y
    if task == "flip":
        return img.flip(2).reshape(-1, 64).contiguous(), y
    if task == "invert":
        return -x, y
    if task == "permute":
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(1234))
        return x[:, perm].contiguous(), y
    if task == "parity":
        return img.transpose(1, 2).reshape(-1, 64).contiguous(), y % 2
    raise ValueError(f"unknown digits task {task!r}")


def _splits(config: DigitsConfig):
    split = load_digits_split(seed=config.split_seed)
    n_fit = int(round(len(split.x_train) * (1 - config.val_fraction)))
    fit = (split.x_train[:n_fit], split.y_train[:n_fit])
    val = (split.x_train[n_fit:], split.y_train[n_fit:])
    return fit, val, split.test


def _train(config: DigitsConfig, tmp: Path) -> None:
    from safetensors.torch import save_file

    fit, _, _ = _splits(config)
    torch.manual_seed(config.seed)
    body = make_body(config.width)
    head = nn.Linear(config.width, 10)
    train_classifier(nn.Sequential(body, head), *fit, epochs=config.pretrain_epochs, lr=config.lr, seed=config.seed)
    base = {k: v.clone() for k, v in body.state_dict().items()}
    save_file(base, str(tmp / "base.safetensors"))
    for i, task in enumerate(config.tasks):
        x, y = transform(task, *fit)
        torch.manual_seed(config.seed + 1 + i)
        head = nn.Linear(config.width, int(y.max()) + 1)
        body = make_body(config.width)
        body.load_state_dict(base)
        body.requires_grad_(False)
        train_classifier(nn.Sequential(body, head), x, y, epochs=config.probe_epochs, lr=config.lr,
                         seed=config.seed + i)
        body.requires_grad_(True)
        head.requires_grad_(False)
        train_classifier(nn.Sequential(body, head), x, y, epochs=config.finetune_epochs, lr=config.lr,
                         seed=config.seed + 100 + i)
        save_fine_tune(tmp, task, body, head)


def prepare(config: DigitsConfig = DigitsConfig(), cache_dir: str | Path | None = None) -> Path:
    """The folder holding the trained base, fine-tunes and heads (trained now if not cached)."""
    return prepare_cached(config, cache_dir, DEFAULT_CACHE, _train)


ADAMERGING = {"lr": 0.01, "steps": 100, "batch_size": 16}  # 100 Adam steps: these nets are tiny


def default_grid() -> MethodGrid:
    lam = {"lambda": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}
    lam_mean = {"lambda": [0.1, 0.25, 0.5, 0.75, 1.0, 1.5]}  # for methods that average the task vectors (normalize)
    lam_iso = {"lambda": [0.5, 1.0, 1.5, 2.0]}  # Iso-C/CTS's alpha: FusionBench's default 1.0, the paper tunes it
    return MethodGrid((
        MethodEntry("simple average", "linear"),
        MethodEntry("task arithmetic", "task_arithmetic", search=lam),
        MethodEntry("TIES", "ties", {"density": 0.2}, lam_mean),
        MethodEntry("DARE-TIES", "dare_ties", {"density": 0.5}, lam),
        MethodEntry("DARE-linear", "dare_linear", {"density": 0.5}, lam),
        MethodEntry("breadcrumbs", "breadcrumbs", {"density": 0.8, "gamma": 0.02}, lam),
        MethodEntry("DELLA", "della", {"density": 0.5, "epsilon": 0.15}, lam_mean),
        MethodEntry("Model Stock", "model_stock"),
        MethodEntry("TSV-M", "tsv", search=lam),
        MethodEntry("Iso-C", "iso_c", search=lam_iso),
        MethodEntry("Iso-CTS", "iso_cts", search=lam_iso),
        MethodEntry("PCB", "pcb", search=lam),
        MethodEntry("MagMax", "magmax", search=lam),
        MethodEntry("CART", "cart", search=lam),
        MethodEntry("consensus TA", "consensus_ta", search=lam),
        MethodEntry("WUDI", "wudi"),
        MethodEntry("Fisher", "fisher"),
        MethodEntry("RegMean", "regmean", {"alpha": 0.9}),
        MethodEntry("RegMean++", "regmean_plusplus", {"alpha": 0.9}),
        MethodEntry("AdaMerging (task-wise)", "adamerging_task", ADAMERGING),
        MethodEntry("AdaMerging (layer-wise)", "adamerging_layer", ADAMERGING),
        MethodEntry("weight matching + average", "weight_matching"),
    ))


def build_suite(cache_dir: str | Path | None = None, config: DigitsConfig = DigitsConfig(),
                tasks: tuple[str, ...] | None = None, grid: MethodGrid | None = None, seed: int | None = None) -> Suite:
    """The `digits-tasks` suite (optionally a subset of its tasks, another method grid, or another training seed)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    config = config if seed is None else replace(config, seed=int(seed))
    folder = prepare(config, cache_dir)
    names = tuple(tasks or config.tasks)
    fit, val, test = _splits(config)
    pool = ModelPool(load_file(str(folder / "base.safetensors")),
                     {t: load_file(str(folder / f"{t}.safetensors")) for t in names},
                     functools.partial(make_body, config.width))
    task_list = []
    for t in names:
        head_state = load_file(str(folder / "heads" / f"{t}.safetensors"))
        head = nn.Linear(config.width, head_state["weight"].shape[0])
        head.load_state_dict(head_state)
        xf, yf = transform(t, *fit)
        task_list.append(Task(t, transform(t, *test), transform(t, *val), (xf[: config.merge_sample],
                                                                           yf[: config.merge_sample]), head.eval()))
    return Suite("digits-tasks", pool, TaskPool(task_list), grid or default_grid(), seed=config.seed,
                 description=__doc__.splitlines()[0])
