"""Where built-in suites keep what they train: one folder per configuration key (`config.key()`), filled in a
sibling `KEY.tmp` and renamed into place once complete, with the configuration as `config.json`. Each fine-tune
lands in `KEY.tmp` atomically (head first, then body), so an interrupted run resumes at the first task without a
body (`trained`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn


def prepare_cached(config: Any, cache_dir: str | Path | None, default_root: Path,
                   train: Callable[[Any, Path], None]) -> Path:
    """The folder of `config`'s trained models; `train(config, folder)` fills a fresh one when it is not cached."""
    root = Path(cache_dir or default_root).expanduser()
    out = root / config.key()
    if not (out / "config.json").is_file():
        tmp = out.with_suffix(".tmp")
        (tmp / "heads").mkdir(parents=True, exist_ok=True)
        train(config, tmp)
        (tmp / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        tmp.replace(out)
    return out


def save_fine_tune(folder: Path, task: str, body: nn.Module, head: nn.Module) -> None:
    """`task`'s fine-tuned body and its head, as `TASK.safetensors` and `heads/TASK.safetensors` (each written to a
    partial file and renamed, the head first: the body's file marks the task done)."""
    from safetensors.torch import save_file

    for module, path in ((head, folder / "heads" / f"{task}.safetensors"), (body, folder / f"{task}.safetensors")):
        part = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(part))
        part.replace(path)


def trained(folder: Path, task: str) -> bool:
    """Whether `save_fine_tune` finished `task` in `folder` (an interrupted training run skips it when resumed)."""
    return (folder / f"{task}.safetensors").is_file() and (folder / "heads" / f"{task}.safetensors").is_file()
