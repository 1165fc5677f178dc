"""training_mode / eval_mode: the mode inside the block, every module's own mode restored after it (also on
error), and the library functions that use them leaving a model's modes as they found them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merging.modes import eval_mode, training_mode
from taxonomy.errors import BasinError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _mixed() -> nn.Module:
    """A training model whose BatchNorm is frozen (eval), as when fine-tuning with frozen statistics."""
    model = _net().train()
    model[1].eval()
    return model


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
@pytest.mark.parametrize("mode", [True, False])
def test_mode_inside_and_each_modules_own_mode_after(start, mode):
    model = {"train": lambda: _net().train(), "eval": lambda: _net().eval(), "mixed": _mixed}[start]()
    before = _modes(model)
    with training_mode(model, mode) as inside:
        assert inside is model
        assert _modes(model) == [mode] * len(before)
    assert _modes(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with training_mode(model, mode):
            raise RuntimeError("boom")
    assert _modes(model) == before


def test_eval_mode_changes_the_output_and_restores_it():
    model, x = _net().train(), torch.randn(8, 4)  # BatchNorm on batch statistics, Dropout active
    torch.manual_seed(1)
    train_out = model(x)
    with eval_mode(model):
        eval_out = model(x)
        assert torch.equal(eval_out, model(x))  # deterministic: running statistics, no dropout
    assert not torch.equal(train_out, eval_out)
    assert _modes(model) == [True] * 6


def test_a_shared_submodule_gets_its_own_mode_back():
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared, nn.ReLU())).train()
    shared.eval()
    model[1].eval()  # a parent in eval over the shared module, whose recorded mode is also eval
    model[1][1].train()
    before = _modes(model)
    with training_mode(model, True):
        pass
    assert _modes(model) == before


def test_library_functions_leave_a_mixed_model_as_they_found_it():
    from evaluations.landscape.geometry import determinism
    from evaluations.landscape.paths import fit_curve
    from merging.alignment.repair import reset_bn_stats, unit_stats
    from merging.modelwise.data_aware import diagonal_fisher, gram_matrices

    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = _mixed()
    before = _modes(model)
    reset_bn_stats(model, x)
    assert _modes(model) == before
    stats = unit_stats(model, ["0"], x)
    assert stats["0"][0].shape == (6,) and _modes(model) == before
    assert set(diagonal_fisher(model, (x, y))) == {n for n, _ in model.named_parameters()}
    assert _modes(model) == before
    assert set(gram_matrices(model, x)) == {"0", "4"} and _modes(model) == before
    other = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    d = determinism(model, [model.state_dict(), other], (x, y))
    assert d.weight_distance[0, 1] > 0 and _modes(model) == before
    fit_curve(model, model.state_dict(), other, (x, y), kind="bezier", epochs=1, batch_size=8, seed=0)
    assert _modes(model) == before


def test_modes_are_restored_when_the_data_does_not_fit():
    from merging.alignment.repair import reset_bn_stats
    from merging.modelwise.data_aware import diagonal_fisher, gram_matrices

    model, bad = _mixed(), torch.randn(4, 5)
    before = _modes(model)
    for call in (lambda: gram_matrices(model, bad), lambda: diagonal_fisher(model, (bad, torch.zeros(4).long()))):
        with pytest.raises(BasinError, match=r"a batch of shape \[?\(4, 5\)\]? does not fit the model"):
            call()
        assert _modes(model) == before
    with pytest.raises(BasinError, match=r"data: a batch of shape \[\(4, 5\)\] does not fit Sequential"):
        reset_bn_stats(model, bad)
    assert _modes(model) == before


def test_ste_refuses_a_step_count_below_one():
    from merging.alignment import infer_spec
    from merging.alignment.ste import ste_matching

    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    for steps in (0, -1, 1.5, True):
        with pytest.raises(BasinError, match="ste: steps must be a positive integer"):
            ste_matching(a, a, infer_spec(a), data, steps=steps)
    assert ste_matching(a, a, infer_spec(a), data, steps=1).method == "ste"
