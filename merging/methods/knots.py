"""KnOTS (Stoica et al. 2025, Model merging with SVD to tie the KnOTS, ICLR 2025, section 4): LoRA updates of one
weight aligned in a shared basis, then merged there with a task-vector method.

For a weight LoRA'd by n adapters, the updates dW_i = s_i B_i A_i (out x in, the layer's orientation even where the
weight is stored transposed: GPT-2's Conv1D, embeddings) are concatenated along the input dimension and decomposed,
    [dW_1 | ... | dW_n] = U S [V_1^T | ... | V_n^T],
so dW_i = U (S V_i^T): U S is shared and the coefficients S V_i^T (k x in) are task-specific. The task-vector
method (task arithmetic, TIES, DARE + TIES) merges the coefficients with a zero base, and
    theta = base + U merged(S V_1^T, ..., S V_n^T)
(lambda and the weights are applied inside the method, as on plain task vectors). As in the authors' code
(task_merger.SVDMerger): the SVD is of the concatenation along columns (`concat_across_output`), S scales V before
the merge, components with a zero singular value are dropped. Unlike it:
- the SVD comes from the factors, never from the dense out x n*in matrix: with P = [s_1 B_1 .. s_n B_n] = Q_P R_P
  and A_i^T = Q_i R_i (QR), the concatenation is Q_P (R_P diag(R_i^T)) diag(Q_i^T), so the SVD of the small core
  (sum r_i square) gives U = Q_P W, S, V_i^T = Z^T[:, block i] Q_i^T (exact; float64 throughout);
- a component is dropped when its singular value is below s_max * max(out, n*in) * eps(float32) (numpy's
  matrix_rank tolerance for float32 inputs), not below the authors' absolute 1e-5, which depends on the scale;
- TIES and DARE act per tensor (as basin's TIES), the authors' over the whole model's coefficients at once;
- the updates carry PEFT's scale s = alpha / r (the authors' code uses B A, the same for their alpha = r).
Ranks may differ between adapters; an adapter that does not target the weight adds a zero block (rank 0).
Tensors no adapter updates with LoRA factors are merged by the same task-vector method on their dense task vectors
(the base where no adapter changes them; `modules_to_save` copies otherwise: the authors' `merge_other_params`).
"""

from __future__ import annotations

from typing import Any

import torch

from merging.io.lora import LoraTensor
from merging.methods.registry import merge_method
from merging.methods.task_arithmetic import generalized_task_arithmetic
from taxonomy.errors import BasinError

Params = dict[str, Any]


def shared_basis(ups: list[torch.Tensor | None], downs: list[torch.Tensor | None]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """U (out x k), S (k) and each task's V_i^T (k x in, zero for a task without an update) of
    [up_1 down_1 | ... | up_n down_n] = U diag(S) [V_1^T | ... | V_n^T], in float64, through QR of the factors."""
    present = [i for i, u in enumerate(ups) if u is not None]
    out_dim = next(ups[i].shape[0] for i in present)
    in_dim = next(downs[i].shape[1] for i in present)
    q_up, r_up = torch.linalg.qr(torch.cat([ups[i].to(torch.float64) for i in present], dim=1))
    q_downs, blocks = [], []
    for i in present:
        q, r = torch.linalg.qr(downs[i].to(torch.float64).T)  # A_i^T = Q_i R_i
        q_downs.append(q)
        blocks.append(r.T)
    core = r_up @ torch.block_diag(*blocks)
    w, s, zh = torch.linalg.svd(core, full_matrices=False)
    tolerance = float(s[0]) * max(out_dim, len(ups) * in_dim) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    keep = s > tolerance
    w, s, zh = w[:, keep], s[keep], zh[keep]
    vhs = [torch.zeros(s.numel(), in_dim, dtype=torch.float64, device=s.device) for _ in ups]
    start = 0
    for i, q in zip(present, q_downs):
        vhs[i] = zh[:, start:start + q.shape[1]] @ q.T
        start += q.shape[1]
    return q_up @ w, s, vhs


def knots_delta(ups: list[torch.Tensor | None], downs: list[torch.Tensor | None], params: Params,
                rng: torch.Generator, sparsify: str | None, consensus: bool) -> torch.Tensor:
    """U merged(S V_i^T), float32, out x in: the task-vector method on the coefficients with a zero base."""
    u, s, vhs = shared_basis(ups, downs)
    if s.numel() == 0:  # every update is zero (B = 0, as PEFT initialises it)
        return torch.zeros(u.shape[0], vhs[0].shape[1])
    coefficients = [(s[:, None] * vh).to(torch.float32) for vh in vhs]
    merged = generalized_task_arithmetic(coefficients, torch.zeros_like(coefficients[0]), params, rng, sparsify,
                                         consensus)
    return (u @ merged.to(torch.float64)).to(torch.float32)


def knots_merge(inputs: list[LoraTensor], base: torch.Tensor, params: Params, rng: torch.Generator,
                sparsify: str | None, consensus: bool) -> torch.Tensor:
    """One tensor of a KnOTS merge (module docstring); `inputs` as `LoraCheckpoint.lora_tensor` reads them."""
    if not all(isinstance(x, LoraTensor) for x in inputs):
        raise BasinError("KnOTS merges LoRA factors: every model must be a base+lora reference (basin merge)")
    lora = [i for i, x in enumerate(inputs) if x.up is not None]
    if not lora:  # no LoRA factors here: the task-vector method on the dense task vectors (modules_to_save)
        if all(x.full is None for x in inputs):
            return base.clone()
        dense = [base if x.full is None else x.full.to(torch.float32) for x in inputs]
        return generalized_task_arithmetic(dense, base, params, rng, sparsify, consensus)
    for i, x in enumerate(inputs):
        if x.full is not None and not torch.equal(x.full.to(base.dtype), base):
            what = "LoRA factors and a full tensor" if x.up is not None else "a full tensor while others have LoRA"
            raise BasinError(f"model {i} holds {what} that differs from the base's; KnOTS merges LoRA factors only")
    transpose = inputs[lora[0]].transpose
    if any(inputs[i].transpose != transpose for i in lora):
        raise BasinError("the adapters disagree on whether this weight is stored transposed (fan_in_fan_out)")
    delta = knots_delta([x.up for x in inputs], [x.down for x in inputs], params, rng, sparsify, consensus)
    return base + (delta.T if transpose else delta)


def _knots(sparsify: str | None, consensus: bool, doc: str):
    def fn(tensors: list, base: torch.Tensor | None, params: Params, rng: torch.Generator) -> torch.Tensor:
        return knots_merge(tensors, base, params, rng, sparsify, consensus)

    fn.__doc__ = doc
    return fn


knots_ta = merge_method("knots_ta")(_knots(None, False, "KnOTS with task arithmetic: exactly base + lambda sum_i "
                                                       "w_i dW_i (the basis is shared, the sum linear)."))
knots_ties = merge_method("knots_ties")(_knots("magnitude", True, "KnOTS-TIES (section 4): TIES on S V_i^T."))
knots_dare = merge_method("knots_dare")(_knots("random", True, "KnOTS-DARE: DARE drop, then TIES sign election "
                                                              "and disjoint mean on S V_i^T."))
