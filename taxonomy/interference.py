"""Data-free interference-reduction merges of task vectors, 2024-2026: isotropic subspaces, competition
balancing, magnitude selection, centred low-rank task vectors, consensus and per-task masks.

Names, parameters and defaults follow FusionBench (tanganke/fusion_bench) where it implements the method,
else the authors' code; each entry's `summary` gives the formula and the module docstring in
`merging/methods/` says where basin differs (chiefly: statistics are per tensor, as the engine streams one
tensor at a time, where the authors' code flattens the whole model).
"""

from taxonomy.core import Family, MethodInfo, Param

ISO_PAPER = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
             "Subspaces")
ISO_LAMBDA = Param("lambda", 1.0, "scale of the merged task vector added to the base (alpha in the paper; "
                                  "FusionBench's scaling_factor)")

ENTRIES: tuple[MethodInfo, ...] = (
    MethodInfo(
        name="iso_c", family=Family.TASK_ARITHMETIC, category="subspace", paper=ISO_PAPER, year=2025,
        needs_base=True, min_models=1, params=(ISO_LAMBDA,),
        summary="per matrix: SVD of the summed task vectors U S V^T, spectrum flattened to its mean: "
                "base + lambda * mean(S) U V^T; other tensors: base + lambda * mean task vector",
    ),
    MethodInfo(
        name="iso_cts", family=Family.TASK_ARITHMETIC, category="subspace", paper=ISO_PAPER, year=2025,
        needs_base=True, min_models=1,
        params=(
            ISO_LAMBDA,
            Param("common_space_fraction", 0.8,
                  "fraction of min(shape) directions taken from the summed task vectors' SVD (the common "
                  "subspace); the rest is shared equally by the tasks' own directions", low=0.0, high=1.0),
        ),
        summary="per matrix: top directions of the summed task vectors plus each task's top directions "
                "orthogonal to them, orthogonalised, with an isotropic (mean) spectrum",
    ),
)
