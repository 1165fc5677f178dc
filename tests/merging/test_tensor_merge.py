import pytest
import torch

from merging.methods.apply import tensor_rng
from merging.modelwise.state_dicts import merge_state_dicts
from taxonomy import BasinError


def test_tensor_rng_depends_on_seed_and_name_only():
    a = torch.rand(5, generator=tensor_rng(1, "w"))
    b = torch.rand(5, generator=tensor_rng(1, "w"))
    c = torch.rand(5, generator=tensor_rng(1, "v"))
    d = torch.rand(5, generator=tensor_rng(2, "w"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_linear_state_dict_merge_against_formula():
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(3, 4, generator=g), "n": torch.tensor([1, 2])} for _ in range(3)]
    out = merge_state_dicts("linear", sds, params={"weight": [1.0, 2.0, 3.0]})
    expected = (sds[0]["w"] + 2 * sds[1]["w"] + 3 * sds[2]["w"]) / 6
    torch.testing.assert_close(out["w"], expected)
    assert torch.equal(out["n"], sds[0]["n"])


def test_wrong_weight_list_length_and_unknown_param():
    sds = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    with pytest.raises(BasinError, match="3 values for 2 models"):
        merge_state_dicts("linear", sds, params={"weight": [1, 1, 1]})
    with pytest.raises(BasinError, match="no parameter 'wieght'"):
        merge_state_dicts("linear", sds, params={"wieght": 1})


def test_shape_mismatch_names_tensor():
    with pytest.raises(BasinError, match="w: model 1 has shape"):
        merge_state_dicts("linear", [{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


def test_a_required_parameter_left_out_is_named():
    sd = {"w": torch.ones(3)}
    with pytest.raises(BasinError, match="slerp: parameter 't' is required"):
        merge_state_dicts("slerp", [sd], base=sd)
