"""Where built-in suites keep what they train: one folder per configuration key (`config.key()`), filled in a
hidden sibling and renamed into place once complete, with the configuration as `config.json`."""

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
    """`task`'s fine-tuned body and its head, as `TASK.safetensors` and `heads/TASK.safetensors`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(folder / f"{task}.safetensors"))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "heads" / f"{task}.safetensors"))
