"""Activation matching reads each site's input as the site saw it, even when the network later changes that
tensor in place (a residual h += f(h) on a Linear's input): same result as the out-of-place network."""

import torch
from torch import nn

from merging.alignment import activation_matching, infer_spec


class Residual(nn.Module):
    def __init__(self, inplace: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inplace = inplace
        self.fc0, self.fc1, self.head = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        if self.inplace:
            h += self.fc1(h)  # overwrites fc1's (and head's) input after fc1 has read it
        else:
            h = h + self.fc1(h)
        return self.head(torch.relu(h))


def test_activation_matching_sees_inputs_before_later_in_place_changes():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for inplace in (False, True):
        a, b = Residual(inplace, 0).eval(), Residual(inplace, 1).eval()
        results.append(activation_matching(a, b, infer_spec(a), x))
    ref, got = results
    assert ref.perms.keys() == got.perms.keys()
    assert all(torch.equal(ref.perms[g], got.perms[g]) for g in ref.perms)
    assert got.objective == ref.objective
