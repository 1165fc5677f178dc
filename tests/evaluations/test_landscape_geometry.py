"""Convexity, connectivity, determinism, directedness: hand-made cases with hand-worked answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evaluations.landscape import (
    PathResult,
    basins_from_matrix,
    connectivity,
    convexity,
    determinism,
    directedness,
    mode_convexity,
)


def test_convexity_of_a_hand_made_curve():
    # v = [0, 2, 1, 1, 0] at alphas 0, .25, .5, .75, 1; the chord is 0 everywhere
    r = PathResult(alphas=np.linspace(0, 1, 5), loss=np.array([0.0, 2.0, 1.0, 1.0, 0.0]), accuracy=np.ones(5))
    c = convexity(r)
    assert c.fraction_below_chord == pytest.approx(2 / 5)
    assert c.max_excess == pytest.approx(2.0)
    assert c.mean_excess == pytest.approx(4.0 / 5)
    h2 = 0.25**2
    d2 = np.array([0 - 4 + 1, 2 - 2 + 1, 1 - 2 + 0]) / h2
    assert c.min_second_difference == pytest.approx(d2.min())
    assert c.mean_second_difference == pytest.approx(d2.mean())
    assert c.fraction_locally_convex == pytest.approx(1 / 3)
    # a parabola is convex: all below the chord, second difference = 2 exactly
    a = np.linspace(0, 1, 11)
    p = convexity(PathResult(alphas=a, loss=a**2, accuracy=np.ones(11)))
    assert p.fraction_below_chord == 1.0 and p.max_excess == pytest.approx(0.0, abs=1e-12)
    assert p.min_second_difference == pytest.approx(2.0) and p.mean_second_difference == pytest.approx(2.0)


def test_basins_from_hand_made_matrices():
    m = np.array([
        [0.0, 0.01, 0.9, 0.8],
        [0.01, 0.0, 0.7, 0.9],
        [0.9, 0.7, 0.0, 0.02],
        [0.8, 0.9, 0.02, 0.0],
    ])
    assert basins_from_matrix(m, 0.05) == [[0, 1], [2, 3]]
    assert basins_from_matrix(m, 0.001) == [[0], [1], [2], [3]]
    assert basins_from_matrix(m, 0.75) == [[0, 1, 2, 3]]
    # single linkage: 0-1 and 1-2 connected, so 0 and 2 share a basin though B_02 is large
    chain = np.array([[0, 0.01, 1.0], [0.01, 0, 0.01], [1.0, 0.01, 0]])
    assert basins_from_matrix(chain, 0.05) == [[0, 1, 2]]


def _two_basin_models():
    """A 1-D problem with a double-well loss in w: (w^2 - 1)^2 via a custom loss; minima at w = -1 and w = +1."""
    model = nn.Linear(1, 1, bias=False)
    states = [{"weight": torch.tensor([[v]])} for v in (-1.0, -0.98, 1.0, 1.02)]

    def loss_fn(out, y):
        w = out[0, 0]  # the input is 1, so the output is the weight
        return (w**2 - 1) ** 2

    data = (torch.ones(1, 1), torch.zeros(1))
    return model, states, data, loss_fn


def test_connectivity_groups_two_wells():
    model, states, data, loss_fn = _two_basin_models()
    conn = connectivity(model, states, data, threshold=0.05, alphas=21, loss_fn=loss_fn, names=list("abcd"))
    assert conn.basins == [[0, 1], [2, 3]]
    # the path -1 -> 1 passes w = 0 at alpha 0.5 with loss 1; endpoint losses are 0
    assert conn.matrix[0, 2] == pytest.approx(1.0)
    assert conn.to_json()["basin_names"] == [["a", "b"], ["c", "d"]]
    mc = mode_convexity(model, states, data, alphas=21, loss_fn=loss_fn)
    assert mc.value == pytest.approx(conn.matrix.max()) and mc.pair in [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert conn.linkage().shape == (3, 4)


def test_connectivity_dendrogram_file(tmp_path):
    pytest.importorskip("matplotlib")
    model, states, data, loss_fn = _two_basin_models()
    conn = connectivity(model, states, data, threshold=0.05, alphas=5, loss_fn=loss_fn)
    out = conn.dendrogram(str(tmp_path / "d.png"))
    assert out and (tmp_path / "d.png").stat().st_size > 0


def test_determinism_by_hand():
    model = nn.Linear(2, 2, bias=False)
    s1 = {"weight": torch.eye(2)}
    s2 = {"weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}  # swaps the two outputs
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.zeros(3, dtype=torch.long)
    d = determinism(model, [s1, s1, s2], (x, y))
    assert d.weight_distance[0, 1] == 0 and d.weight_distance[0, 2] == pytest.approx(2.0)
    assert d.relative_weight_distance[0, 2] == pytest.approx(2.0 / np.sqrt(2))
    # rows 0 and 1 flip the argmax; row 2 is a tie (argmax 0 for both)
    assert d.disagreement[0, 2] == pytest.approx(2 / 3) and d.disagreement[0, 1] == 0
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    gap = float((p - p.flip(0)).norm())
    assert d.function_distance[0, 2] == pytest.approx((2 * gap + 0) / 3, rel=1e-6)
    assert d.to_json()["mean_disagreement"] == pytest.approx((0 + 2 / 3 + 2 / 3) / 3)


def test_directedness_by_hand():
    base = {"w": torch.zeros(3)}
    states = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])},
              {"w": torch.tensor([-2.0, 0.0, 0.0])}]
    d = directedness(base, states)
    assert d.cosine[0, 1] == pytest.approx(1 / np.sqrt(2)) and d.cosine[0, 2] == pytest.approx(-1.0)
    assert d.norms == pytest.approx([1.0, np.sqrt(2), 2.0])
    s = directedness(base, states, successive=True)  # updates: (1,0,0), (0,1,0), (-3,-1,0)
    assert s.cosine[0, 1] == pytest.approx(0.0) and s.cosine[1, 2] == pytest.approx(-1 / np.sqrt(10))


def test_states_of_another_architecture_are_one_line_errors():
    """determinism, directedness, mode_convexity: a state of other shapes or names is a BasinError naming the
    model and the tensor (determinism raised torch's RuntimeError from the flattening)."""
    import pytest
    from torch import nn

    from evaluations.landscape.geometry import determinism, directedness, mode_convexity
    from taxonomy.errors import BasinError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    a = model.state_dict()
    wide = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3)}
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(BasinError, match=r"tensor '0.weight': shape \(3, 4\) in model 0 vs \(3, 5\) in model 1"):
        determinism(model, [a, wide], data)
    with pytest.raises(BasinError, match="tensor '0.bias' is missing from model 1"):
        determinism(model, [a, {"0.weight": a["0.weight"]}], data)
    with pytest.raises(BasinError, match=r"model 0: tensor '0.weight' has shape \(3, 5\), the model's is \(3, 4\)"):
        determinism(model, [wide, wide], data)
    with pytest.raises(BasinError, match="in base vs"):
        directedness(a, [wide])
    with pytest.raises(BasinError, match="model 0: tensor"):
        mode_convexity(model, [wide, wide], data)
    d = determinism(model, [a, {k: v + 1 for k, v in a.items()}], data)
    assert d.weight_distance[0, 1] == pytest.approx(float(torch.full((15,), 1.0, dtype=torch.float64).norm()))
