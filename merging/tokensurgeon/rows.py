"""The output's vocabulary-indexed tensors: shared rows copied bit for bit, donor-only rows approximated
(`merging.tokensurgeon.approximate`), every other row zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from merging.tokensurgeon import approximate


def remap_shared(plan: Any, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (vocabulary on dim 0) with the output's rows: the model's row of each shared token, zeros else."""
    out = tensor.new_zeros((plan.rows, *tensor.shape[1:]))
    donor_ids = torch.tensor(sorted(plan.tokens.shared), dtype=torch.long)
    model_ids = torch.tensor([plan.tokens.shared[i] for i in donor_ids.tolist()], dtype=torch.long)
    out[donor_ids] = tensor[model_ids]
    return out


def rebuild(plan: Any, mine: torch.Tensor, theirs: torch.Tensor, batch: int,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The output rows of one matrix: `mine` is the model's (embedding or head), `theirs` the donor's."""
    out = remap_shared(plan, mine)
    new = [i for i in plan.tokens.new if i < theirs.shape[0] or plan.method != "omp"]
    if not new:
        return out
    values = _approximate(plan, new, mine, theirs, batch, progress)
    out[torch.tensor(new, dtype=torch.long)] = values.to(mine.dtype)
    return out


def _approximate(plan: Any, new: list[int], mine: torch.Tensor, theirs: torch.Tensor, batch: int,
                 progress: Callable[[int], None] | None) -> torch.Tensor:
    """float64 rows for the donor ids `new`, by the plan's method."""
    if plan.method != "omp":
        if progress is not None:
            progress(len(new))
        if plan.method == "zero":
            return torch.zeros(len(new), mine.shape[1], dtype=torch.float64)
        if plan.method == "mean":
            return approximate.mean_row(mine).expand(len(new), -1)
        return approximate.subword_rows(pieces(plan, new, mine.shape[0]), mine)
    shared = [d for d in sorted(plan.tokens.shared) if d < theirs.shape[0]]
    atoms = theirs[torch.tensor(shared, dtype=torch.long)].to(torch.float64)
    model_rows = mine[torch.tensor([plan.tokens.shared[d] for d in shared], dtype=torch.long)]
    return approximate.omp_rows(theirs[torch.tensor(new, dtype=torch.long)], atoms, model_rows, plan.k, batch,
                                progress)


def pieces(plan: Any, new: list[int], rows: int) -> list[list[int]]:
    """Per donor id, the model's ids of its text (the donor tokenizer's string of the token), special tokens not
    added; ids without a row dropped."""
    donor, model = plan.donor.tokenizer, plan.model.tokenizer
    out = []
    for i in new:
        text = donor.convert_tokens_to_string([plan.tokens.donor_tokens[i]]) if i in plan.tokens.donor_tokens else ""
        ids = model(text, add_special_tokens=False)["input_ids"] if text else []
        out.append([j for j in ids if j < rows])
    return out
