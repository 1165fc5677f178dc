"""Model references: local paths or Hub ids `org/name[@revision]`, resolved to local folders.

Hub ids go through `huggingface_hub.snapshot_download` with allow-patterns limited to weights,
config and tokenizer files; `HF_HUB_OFFLINE` and `HF_HUB_CACHE` are honoured (huggingface_hub
reads them). The resolved commit is the snapshot folder's name, recorded in the model card.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from merging.io.hf_files import SIDE_PATTERNS
from merging.io.references import hub_id
from taxonomy.errors import CheckpointError

CONFIG_PATTERNS = SIDE_PATTERNS
WEIGHT_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin", "*.bin.index.json"]


@dataclass(frozen=True)
class Resolved:
    """A model reference resolved to a local path; `revision` is the Hub commit, if any."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None


def resolve(ref: str, *, allow_pickle: bool = False, weights: bool = True) -> Resolved:
    """A local file/folder as is, else a Hub id through the cache (download unless offline).

    `weights=False` fetches only config, index and tokenizer files (cheap validation).
    """
    local = Path(os.path.expanduser(ref))
    if local.exists():
        return Resolved(ref, local)
    hub = hub_id(ref)
    if hub is None:
        raise CheckpointError(f"{ref}: no such file or folder")
    repo_id, rev = hub
    patterns = list(CONFIG_PATTERNS)
    if weights:
        patterns += WEIGHT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as err:
        where = f" in the cache {constants.HF_HUB_CACHE}" if offline else ""
        mode = " (HF_HUB_OFFLINE is set)" if offline else ""
        kind = type(err).__name__
        raise CheckpointError(
            f"{ref}: not a local path, and Hub repo {repo_id!r}"
            f"{'@' + rev if rev else ''} could not be resolved{where}{mode}: {kind}"
        ) from None
    return Resolved(ref, folder, repo_id=repo_id, revision=folder.name)


def weights_cached(folder: Path) -> bool:
    """Whether a snapshot folder already holds every safetensors weight file its index names."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = set(weight_map.values())
            return all(isinstance(s, str) and "\0" not in s and (folder / s).is_file() for s in shards)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError):
            return False  # opening the checkpoint reports what is wrong with the index
    return (folder / "model.safetensors").is_file()


def remote_headers(repo_id: str, revision: str | None, label: str):
    """A names-and-shapes-only checkpoint from the Hub's safetensors headers (HTTP range reads, no weights)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    from merging.io.checkpoint import HeaderCheckpoint, TensorMeta
    from merging.io.safetensors_format import DTYPES

    try:
        info = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"{label}: cannot read the safetensors headers of {repo_id!r} on the Hub: "
                         f"{type(err).__name__}") from None
    metas = {}
    for file_meta in info.files_metadata.values():
        for name, t in file_meta.tensors.items():
            if t.dtype not in DTYPES:
                raise CheckpointError(f"{label}: tensor {name!r} has dtype {t.dtype}, which basin cannot read")
            metas[name] = TensorMeta(tuple(t.shape), DTYPES[t.dtype])
    return HeaderCheckpoint(metas, label)
