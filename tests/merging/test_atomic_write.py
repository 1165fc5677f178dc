"""merging.io.atomic: every user-facing output is written to a temporary and renamed into place."""

from __future__ import annotations

import json

import pytest
import torch

from merging.io.atomic import atomic_write, atomic_write_text
from taxonomy.errors import OutputError


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old\n")

    def half(tmp):
        tmp.write_text("half-writ")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*out.json: No space left on device; nothing was written"):
        atomic_write(target, half)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too: the temporary goes, the old file stays
        atomic_write(target, lambda tmp: (tmp.write_text("x"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_tracker_checkpoints_and_json_are_atomic(tmp_path, monkeypatch):
    """Tracker's torch.save of a snapshot: a crash mid-save leaves no epoch_*.pt behind; saved ones load back."""
    from torch import nn

    from evaluations.tracking import Tracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    probe = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    tracker = Tracker(probe=probe, hessian=False, barriers=False, checkpoint_dir=str(tmp_path / "ck"))
    tracker.record(model, 0)
    saved = torch.load(tmp_path / "ck" / "epoch_0.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OutputError, match="epoch_1.pt: Input/output error"):
        tracker.record(model, 1)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch_0.pt"]
    tracker.save(str(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text())["records"][0]["epoch"] == 0
