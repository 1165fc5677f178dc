"""Task arithmetic family: merges of task vectors tau_i = theta_i - theta_base.

mergekit's "generalized task arithmetic" (task_arithmetic, ties, dare_*, breadcrumbs*, della*)
is one pipeline, and so is this one: (1) task vectors; (2) per model, sparsify tau_i (top-k,
random drop, outlier band, or DELLA MagPrune) with optional rescale; (3) weight, w_i tau_i;
(4) combine: a sum, or TIES sign election with a disjoint sum; (5) optionally divide by the sum
of the (agreeing) weights (`normalize`); (6) theta = base + lambda * merged.

Where this follows mergekit rather than the papers (documented per method):
- sign election uses the *weighted* task vectors (the TIES paper elects from unweighted ones;
  identical when all weights are 1); zero sums elect +, zero entries never agree;
- `rescale: true` (default for DARE/DELLA) matches the L1 norm of each task vector after the drop,
  as mergekit does; `rescale: unbiased` divides by the keep probability as the DARE (eq. 2) and
  DELLA papers do (exact in expectation);
- `density >= 1` leaves a task vector untouched (no outlier removal, no rescale), as mergekit;
- `int8_mask` is accepted and ignored: the engine already merges one tensor at a time.
Task arithmetic, TIES, DARE and Breadcrumbs stream: `TaskVectorMerge` finds each model's exact top-k
threshold (or draws its DARE mask) in a prepare pass over cache-sized chunks, then merges chunk by chunk
(merging.methods.chunking), never holding a float32 copy of a whole input; on the CPU both passes run in the
compiled kernel (merging/methods/_fused.c, the same bits) where it was built. DELLA streams too: its masks are
drawn per range of rows (`magprune_masks`: the rows a group of chunks touches, ranked on their own, a row cut by a
group border ranked by both; in parallel over groups), its L1 sums in numpy's whole-tensor order; `rescale:
unbiased` recomputes the keep probabilities per chunk instead of holding them. Model Stock and SCE are two-phase too
(`ModelStock`, `Sce`: whole-tensor statistics, then chunks). DARE's and DELLA's masks come from the counter-based
Philox generator (merging.methods.philox) keyed by (a key drawn from the per-tensor generator, model index, entry
index), so they are the same for any chunk size, thread count or device (DELLA's drew torch.rand from the per-tensor
generator, model by model, before issue 26: other draws, the same distribution, so its outputs changed bits);
mergekit's draws (global torch RNG) are not reproducible, so only the distribution matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from merging.methods import kernels, philox
from merging.methods.chunking import ChunkedInputs, TwoPhase
from merging.methods.registry import merge_method
from merging.methods.sparsify import (
    KEEP_ALL,
    KEEP_BAND,
    KEEP_MASK,
    check_della,
    l1_rescale_factor,
    magnitude_band_mask,
    magnitude_cuts,
    magprune_keep,
    magprune_masks,
    mask_and_rescale_,
    mul_mask_,
    random_mask,
    random_masks,
    rank_keep_probability,
    sign_consensus_disjoint_sum_,
    topk_mask,
    unpack_mask,
)
from merging.reductions import REDUCTION_CHUNK, row_dots64, row_norms64, square_parts64
from taxonomy.errors import BasinError

Params = dict[str, Any]


def sparsify_task_vector_(delta: torch.Tensor, how: str | None, i: int, params: Params,
                          rng: torch.Generator, key: int | None = None) -> torch.Tensor:
    """Sparsify model i's task vector in place: 'magnitude' (TIES), 'random' (DARE, drawn from `rng`), 'outliers'
    (Breadcrumbs), 'della' (MagPrune: Philox uniforms under `key`, the tensor's, stream i; drawn from `rng` if
    None), or None."""
    if how is None:
        return delta
    density = params["density"][i]
    if density >= 1:
        return delta
    rescale = params["rescale"]
    if how == "magnitude":
        magnitude = delta.abs()
        mask = topk_mask(magnitude, int(density * delta.numel()))
        return mask_and_rescale_(delta, mask, rescale, density, magnitude)
    if how == "outliers":
        magnitude = delta.abs()
        mask = magnitude_band_mask(magnitude, density, params["gamma"][i])
        return mask_and_rescale_(delta, mask, rescale, density, magnitude)
    if how == "random":
        mask = random_mask(delta.shape, density, rng, delta.device)
        return mask_and_rescale_(delta, mask, rescale, density)
    if how == "della":
        magnitude = delta.abs()
        keep = rank_keep_probability(magnitude, density, params["epsilon"][i])
        key = philox.draw_key(rng) if key is None else key
        mask = philox.uniforms(key, i, 0, delta.numel(), delta.device).view(delta.shape) < keep
        return mask_and_rescale_(delta, mask, rescale, keep, magnitude)
    raise ValueError(how)


def generalized_task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, params: Params,
                                rng: torch.Generator, sparsify: str | None, consensus: bool) -> torch.Tensor:
    """base + lambda * combine_i(w_i * sparsify(theta_i - base)), see the module docstring.

    The whole-tensor form (KnOTS merges its coefficients with it); the streaming `TaskVectorMerge` is tested bit
    for bit against it (DARE there draws from Philox, here from `rng`; DELLA from Philox in both, under one key per
    tensor drawn first).

    Without sign election the task vectors are summed as they are made (one in memory at a time).
    """
    weights = [float(w) for w in params["weight"]]
    normalize = params["normalize"]
    key = philox.draw_key(rng) if sparsify == "della" else None

    def weighted(i: int) -> torch.Tensor:
        delta = sparsify_task_vector_(tensors[i] - base, sparsify, i, params, rng, key)
        return delta.mul_(weights[i]) if weights[i] != 1 else delta

    if consensus:
        mixed = sign_consensus_disjoint_sum_([weighted(i) for i in range(len(tensors))], weights, normalize)
    else:
        mixed = weighted(0)
        for i in range(1, len(tensors)):
            mixed.add_(weighted(i))
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    if params["lambda"] != 1:
        mixed.mul_(params["lambda"])
    return mixed.add_(base)


class TaskVectorMerge(TwoPhase):
    """Streaming `generalized_task_arithmetic`: None, 'magnitude' (TIES), 'outliers' (Breadcrumbs), 'random'
    (DARE), 'della' (MagPrune).

    `prepare` finds, per model, the exact top-k cut(s) of |tau_i| (`magnitude_cuts`) or draws the DARE
    or DELLA mask (`random_masks`, `magprune_masks`), and the rescale factor; `apply` then merges one chunk
    with the same float32 operations, in the same order, as `generalized_task_arithmetic`. Calling the object
    merges whole tensors through the same two phases.
    """

    def __init__(self, sparsify: str | None, consensus: bool, doc: str) -> None:
        self.sparsify, self.consensus, self.__doc__ = sparsify, consensus, doc

    def _sparsified(self, params: Params, i: int) -> bool:
        return self.sparsify is not None and params["density"][i] < 1

    def prepare(self, inputs: ChunkedInputs, params: Params, rng: torch.Generator) -> dict[str, Any]:
        n, m = inputs.numel, len(inputs.tensors)
        rescale = params["rescale"]
        state: dict[str, Any] = {"scale": [1.0] * m}
        if self.sparsify in ("magnitude", "outliers"):
            ks: list[list[int]] = []
            for i in range(m):
                density = params["density"][i]
                if not self._sparsified(params, i):
                    ks.append([])
                elif self.sparsify == "magnitude":
                    ks.append([int(density * n)])
                else:
                    keep = int(density * n)
                    top = min(int(params["gamma"][i] * n), n - keep)
                    ks.append([keep + top, top])
            cuts, totals, kept = magnitude_cuts(inputs, ks, sums=rescale is True)
            state["cuts"] = cuts
            if rescale is True:
                state["scale"] = [l1_rescale_factor(totals[i], kept[i][0] - sum(kept[i][1:])) if ks[i] else 1.0
                                  for i in range(m)]
        elif self.sparsify == "random":
            key = philox.draw_key(rng)
            keep = [params["density"][i] if self._sparsified(params, i) else 1.0 for i in range(m)]
            masks, totals, kept = random_masks(inputs, keep, key, sums=rescale is True)
            state["masks"] = masks
            if rescale is True:
                state["scale"] = [l1_rescale_factor(totals[i], kept[i]) if keep[i] < 1 else 1.0 for i in range(m)]
        elif self.sparsify == "della":
            self._prepare_della(inputs, params, rng, state)
        elif self.sparsify is not None:
            raise ValueError(self.sparsify)
        return state

    def _prepare_della(self, inputs: ChunkedInputs, params: Params, rng: torch.Generator,
                       state: dict[str, Any]) -> None:
        """DELLA's MagPrune masks (`magprune_masks`: Philox uniforms under one key drawn from the tensor's generator,
        the draws of `sparsify_task_vector_`), packed per chunk as DARE's, with the L1 sums; `rescale: unbiased`
        keeps no probabilities: `apply` recomputes them per chunk (`magprune_keep`)."""
        m = len(inputs.tensors)
        key = philox.draw_key(rng)
        drop = [(params["density"][i], params["epsilon"][i]) if self._sparsified(params, i) else None
                for i in range(m)]
        for d in drop:
            if d is not None:
                check_della(*d)
        rescale = params["rescale"]
        masks, totals, kept = magprune_masks(inputs, drop, key, sums=rescale is True)
        state.update(masks=masks, drop=drop, inputs=inputs, span=(inputs.chunk_elements, inputs.numel))
        if rescale is True:
            state["scale"] = [l1_rescale_factor(totals[i], kept[i]) if drop[i] else 1.0 for i in range(m)]

    def fused(self, inputs: ChunkedInputs, params: Params, state: dict[str, Any]
              ) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """`apply` as one pass of the compiled kernel (merging/methods/_fused.c): kernel(chunk, out) writes the
        merged float32 chunk into `out`, reading the stored inputs directly. None where the kernel does not
        apply (not built, not on the CPU, float16 or non-contiguous inputs): then `apply` runs, with the same
        bits (tested)."""
        if not kernels.readable(inputs.tensors + [inputs.base], inputs.numel):
            return None
        if self.sparsify == "della" and params["rescale"] == "unbiased":  # a division by a tensor: torch ops
            return None
        weights = [float(w) for w in params["weight"]]
        rescale, normalize, lam = params["rescale"], params["normalize"], params["lambda"]
        total = sum(weights)
        combine = (int(self.consensus), int(normalize), int(min(weights) > 0), min(weights),
                   int(not self.consensus and normalize and abs(total) >= 1e-8), int(lam != 1), total, lam)

        def model(i: int, chunk: int, start: int) -> tuple:
            t = inputs.tensors[i]
            keep, cut, allowed, mask, post, post_value = KEEP_ALL, 0.0, 0, 0, kernels.POST_NONE, 0.0
            outer, inner = KEEP_ALL, (KEEP_ALL, 0.0, 0)
            if self._sparsified(params, i):
                if self.sparsify in ("random", "della"):
                    keep, mask = KEEP_MASK, state["masks"][i][chunk].data_ptr()
                elif self.sparsify == "outliers":  # Breadcrumbs: the band between two cuts
                    outer, cut, allowed = state["cuts"][i][0].rule(chunk)
                    keep, inner = KEEP_BAND, state["cuts"][i][1].rule(chunk)
                else:
                    keep, cut, allowed = state["cuts"][i][0].rule(chunk)
                if rescale == "unbiased":
                    post, post_value = kernels.POST_DIVIDE, params["density"][i]
                elif rescale is True and state["scale"][i] != 1.0:
                    post, post_value = kernels.POST_MULTIPLY, state["scale"][i]
            return (kernels.address(t, start), kernels.DTYPE_CODES[t.dtype], keep, cut, allowed, mask, post,
                    post_value, weights[i], outer, *inner)

        def kernel(chunk: int, out: torch.Tensor) -> torch.Tensor:
            start, stop = inputs.span(chunk)
            models = tuple(model(i, chunk, start) for i in range(len(inputs.tensors)))
            kernels.compiled.merge_chunk(out.data_ptr(), stop - start, kernels.address(inputs.base, start),
                                         kernels.DTYPE_CODES[inputs.base.dtype], models, combine)
            return out

        return kernel

    def _task_vector(self, x: torch.Tensor, base: torch.Tensor, i: int, params: Params, state: dict[str, Any],
                     chunk: int) -> torch.Tensor:
        """Model i's sparsified, rescaled task vector on one chunk (x is consumed)."""
        tau = x.sub_(base)
        if not self._sparsified(params, i):
            return tau
        rescale = params["rescale"]
        if self.sparsify in ("random", "della"):
            mul_mask_(tau, unpack_mask(state["masks"][i][chunk], tau.numel()))
            if rescale == "unbiased" and self.sparsify == "della":
                start, stop = self._span(state, chunk)
                return tau.div_(magprune_keep(state["inputs"], i, state["drop"][i], start, stop).to(tau.device))
            if rescale == "unbiased":
                return tau.div_(params["density"][i])
        else:
            magnitude = tau.abs()
            cuts = state["cuts"][i]
            if len(cuts) == 1:
                kept = cuts[0].keep_(magnitude, chunk)
            else:  # Breadcrumbs: the band between the two cuts
                kept = cuts[0].keep_(magnitude.clone(), chunk).sub_(cuts[1].keep_(magnitude, chunk))
            tau = torch.copysign(kept, tau, out=tau)  # tau * mask, signed zeros included
            if rescale == "unbiased":
                return tau.div_(params["density"][i])
        if rescale is True and state["scale"][i] != 1.0:
            tau.mul_(state["scale"][i])
        return tau

    @staticmethod
    def _span(state: dict[str, Any], chunk: int) -> tuple[int, int]:
        size, numel = state["span"]
        return chunk * size, min(numel, (chunk + 1) * size)

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: Params, state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        weights = [float(w) for w in params["weight"]]
        weighted = []
        for i, x in enumerate(chunks):
            tau = self._task_vector(x, base, i, params, state, chunk)
            weighted.append(tau.mul_(weights[i]) if weights[i] != 1 else tau)
        if self.consensus:
            mixed = sign_consensus_disjoint_sum_(weighted, weights, params["normalize"])
        else:
            mixed = weighted[0]
            for wd in weighted[1:]:
                mixed.add_(wd)
            total = sum(weights)
            if params["normalize"] and abs(total) >= 1e-8:
                mixed.div_(total)
        if params["lambda"] != 1:
            mixed.mul_(params["lambda"])
        return mixed.add_(base)


task_arithmetic = merge_method("task_arithmetic")(TaskVectorMerge(None, False, """Ilharco et al. 2023: \
base + lambda * sum_i w_i tau_i (divided by sum_i w_i with `normalize`). Same as mergekit. A negative weight
subtracts a task (forgetting)."""))

ties = merge_method("ties")(TaskVectorMerge("magnitude", True, """Yadav et al. 2023 (TIES-Merging, Alg. 1): \
trim each tau_i to its int(density n) largest magnitudes, elect the sign of sum_i w_i trim(tau_i), average
agreeing entries weighted by w_i (`normalize`, default true), scale by lambda. As mergekit, except: ties at
the trim threshold keep the lowest flat indices (mergekit: whatever order its argsort returns), and
int(density n) == 0 keeps nothing instead of failing."""))

dare_linear = merge_method("dare_linear")(TaskVectorMerge("random", False, """Yu et al. 2024 (DARE, eq. 1-2): \
drop each entry of tau_i with probability 1 - density, rescale (mergekit: L1 norm match; `rescale: unbiased`:
1 / density as the paper), weighted sum."""))

dare_ties = merge_method("dare_ties")(TaskVectorMerge("random", True, """DARE drop and rescale (Yu et al. 2024), \
then TIES sign election and disjoint sum, as mergekit."""))

breadcrumbs = merge_method("breadcrumbs")(TaskVectorMerge("outliers", False, """Davari and Belilovsky 2024 \
(Model Breadcrumbs): per task vector, remove the int(gamma n) largest magnitudes and then the smallest so that
int(density n) remain; weighted sum. As mergekit (whole tensor, not per layer row), except gamma * n < 1
removes no outliers where mergekit's slice removes everything."""))

breadcrumbs_ties = merge_method("breadcrumbs_ties")(TaskVectorMerge("outliers", True, """Model Breadcrumbs \
masks followed by TIES sign election and disjoint sum (mergekit's variant)."""))


della = merge_method("della")(TaskVectorMerge("della", True, """Deep et al. 2024 (DELLA, MagPrune): keep \
entry j of a row with probability density - epsilon + 2 epsilon rank_j / (n - 1) (larger magnitude, likelier kept),
rescale, TIES sign election, disjoint mean (`normalize` true by default), as mergekit. The draws are Philox uniforms
at each entry's index (as DARE's; torch.rand before issue 26, so the bits changed then), the masks streamed per
range of rows."""))

della_linear = merge_method("della_linear")(TaskVectorMerge("della", False, """DELLA's MagPrune drop and rescale \
followed by a weighted sum (mergekit's `della_linear`)."""))


class ModelStock(TwoPhase):
    """Jang et al. 2024 (Model Stock, eq. 2): t = N cos(theta) / (1 + (N - 1) cos(theta)),
    theta_H = t * mean_i theta_i + (1 - t) * base.

    cos(theta) is the mean over pairs i < j of the cosine between tau_i and tau_j (the paper states
    the two-model case; mergekit's rule for more), over the whole tensor, or per row with
    `filter_wise` (1-D tensors: one row). Norm products are clamped at 1e-6 as mergekit. The one
    deviation: where 1 + (N - 1) cos(theta) = 0 (exactly opposite task vectors) t is undefined and
    this raises, where mergekit would write inf/nan.

    Two phases (merging.methods.chunking): `prepare` finds t per row from the float64 norms and dots (on the CPU
    one compiled pass over the stored inputs, numpy's pairwise sums of `merging.reductions.row_dots64`: the same
    bits), `apply` interpolates chunk by chunk.
    """

    def prepare(self, inputs: ChunkedInputs, params: Params, rng: torch.Generator) -> dict[str, Any]:
        n, numel, shape = len(inputs.tensors), inputs.numel, inputs.shape or (inputs.numel,)
        width = math.prod(shape[1:]) if params["filter_wise"] and len(shape) >= 2 else numel
        rows = numel // width if width else 1
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        sums = self._compiled_sums(inputs, rows, width, n) if width else None
        if sums is not None:
            lengths = [sums[:, i].sqrt_() for i in range(n)]
            dots = [sums[:, n + p] for p in range(len(pairs))]
        else:  # the float32 task vectors as rows, float64 reductions in torch ops
            b = inputs.base.to(torch.float32).reshape(rows, -1)
            offsets = [t.to(torch.float32).reshape(rows, -1) - b for t in inputs.tensors]
            lengths = [row_norms64(o) for o in offsets]
            dots = [row_dots64(offsets[i], offsets[j]) for i, j in pairs]
        cosines = []
        for (i, j), dot in zip(pairs, dots):
            norms = (lengths[i] * lengths[j]).clamp_(min=1e-6)
            cosines.append((dot / norms).clamp_(-1, 1))
        cos = torch.stack(cosines).mean(0).unsqueeze(-1)
        denominator = 1 + (n - 1) * cos
        if bool((denominator.abs() < 1e-6).any()):
            raise BasinError("model_stock: the task vectors point in opposite directions (cos = -1/(N-1)); "
                             "the interpolation ratio is undefined")
        t = (n * cos / denominator).to(torch.float32).reshape(-1)
        return {"t": t, "width": max(1, width), "span": (inputs.chunk_elements, numel)}

    @staticmethod
    def _compiled_sums(inputs: ChunkedInputs, rows: int, width: int, n: int) -> torch.Tensor | None:
        """[rows, n squares then the dots i < j] of the float32 task vectors' rows, float64, or None where the
        kernel cannot read the inputs."""
        if not hasattr(kernels.compiled, "stats_chunks") or n > 64 or not kernels.readable(
                inputs.tensors + [inputs.base], inputs.numel):
            return None
        sums = torch.empty(rows, n + n * (n - 1) // 2, dtype=torch.float64)
        code = kernels.DTYPE_CODES
        kernels.compiled.stats_chunks(sums.data_ptr(), inputs.numel, width,
                                      tuple((kernels.address(t), code[t.dtype]) for t in inputs.tensors),
                                      (kernels.address(inputs.base), code[inputs.base.dtype]), True)
        return sums

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: Params, state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        size, numel = state["span"]
        start, stop = chunk * size, min(numel, (chunk + 1) * size)
        t, width = state["t"].to(base.device), state["width"]
        first, last = start // width, (stop - 1) // width
        if first == last:
            t = t[first:first + 1]
        else:
            t = t[first:last + 1].repeat_interleave(width)[start - first * width:stop - first * width]
        average = torch.stack(chunks).mean(0)
        return t * average + (1 - t) * base


model_stock = merge_method("model_stock")(ModelStock())


class Sce(TwoPhase):
    """Wan et al. 2024 (FuseChat, SCE): Select the int(select_topk * nnz) entries of highest variance
    across the task vectors (population variance; nnz counts entries of nonzero variance), Calculate
    per-model weights mean(tau_i^2) / sum_j mean(tau_j^2) (uniform if that sum is < 1e-6), Erase
    entries whose sign disagrees with the elected sign of sum_i tau_i; base + sum of kept weighted
    entries / sum of their weights (clamped at 1e-6). As mergekit; ties in the variance ranking keep
    the lowest indices.

    Two phases (merging.methods.chunking): `prepare` gathers the variance mask (whole-tensor top-k) and the
    weights' float64 sums of squares (`merging.reductions.sum_squares64`'s parts, chunk by chunk; on the CPU
    without selection one compiled pass over the stored inputs), `apply` elects and erases chunk by chunk.
    """

    def prepare(self, inputs: ChunkedInputs, params: Params, rng: torch.Generator) -> dict[str, Any]:
        n, numel = len(inputs.tensors), inputs.numel
        mask = None
        if params["select_topk"] < 1:
            variance = torch.empty(numel, dtype=torch.float32, device=inputs.base.device)

            def spread(index: int, chunks: list[torch.Tensor], base: torch.Tensor | None) -> None:
                start, stop = inputs.span(index)
                variance[start:stop] = torch.stack([x.sub_(base) for x in chunks]).var(dim=0, unbiased=False)

            inputs.map(spread)
            k = int(int(torch.count_nonzero(variance)) * params["select_topk"])
            mask = topk_mask(variance.abs(), k)
            del variance
        parts = self._compiled_parts(inputs) if mask is None else None
        if parts is None:

            def squares(index: int, chunks: list[torch.Tensor], base: torch.Tensor | None) -> list[list[float]]:
                start, stop = inputs.span(index)
                taus = [x.sub_(base) for x in chunks]
                if mask is not None:
                    taus = [tau * mask[start:stop] for tau in taus]
                return [square_parts64(tau) for tau in taus]

            per_chunk = inputs.map(squares)
            parts = [[p for c in per_chunk for p in c[i]] for i in range(n)]
        energy = torch.tensor([math.fsum(parts[i]) / max(1, numel) for i in range(n)], dtype=torch.float64)
        total = float(energy.sum())
        weights = (energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / n)).to(torch.float32)
        return {"mask": mask, "weights": weights.view(-1, 1), "span": (inputs.chunk_elements, numel)}

    @staticmethod
    def _compiled_parts(inputs: ChunkedInputs) -> list[list[float]] | None:
        """`square_parts64` of each float32 task vector from one compiled pass, or None where it does not apply."""
        n, numel = len(inputs.tensors), inputs.numel
        if not hasattr(kernels.compiled, "stats_chunks") or n > 64 or numel == 0 or not kernels.readable(
                inputs.tensors + [inputs.base], numel):
            return None
        sums = torch.empty(-(-numel // REDUCTION_CHUNK), n, dtype=torch.float64)
        code = kernels.DTYPE_CODES
        kernels.compiled.stats_chunks(sums.data_ptr(), numel, REDUCTION_CHUNK,
                                      tuple((kernels.address(t), code[t.dtype]) for t in inputs.tensors),
                                      (kernels.address(inputs.base), code[inputs.base.dtype]), True, True)
        return [sums[:, i].tolist() for i in range(n)]

    def apply(self, chunks: list[torch.Tensor], base: torch.Tensor, params: Params, state: dict[str, Any],
              chunk: int) -> torch.Tensor:
        tvs = torch.stack([x.sub_(base) for x in chunks])
        if state["mask"] is not None:
            size, numel = state["span"]
            mul_mask_(tvs, state["mask"][chunk * size:min(numel, (chunk + 1) * size)].expand_as(tvs).contiguous())
        # agree: tau > 0 where the elected sign is + (sum >= 0), tau < 0 elsewhere, as tau * (+-1) > 0 (exact)
        elected = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
        erased = state["weights"].to(tvs.device) * (tvs * elected > 0)
        return base + tvs.mul_(erased).sum(0) / erased.sum(0).clamp_(min=1e-6)


sce = merge_method("sce")(Sce())
