"""Permutation-alignment family: permute one model's hidden units onto another's before averaging.

Ainsworth et al. 2023 (Git Re-Basin) for weight and activation matching, Jordan et al. 2023 for
REPAIR. These run over whole models (merging.alignment), not per tensor.
"""

from taxonomy.core import Family, Kind, MethodInfo, Param

REBASIN = "Ainsworth et al. 2023, Git Re-Basin: Merging Models modulo Permutation Symmetries"
SEED = Param("seed", 0, "seed of the random order in which permutation groups are visited")

ENTRIES: tuple[MethodInfo, ...] = (
    MethodInfo(
        name="weight_matching",
        family=Family.PERMUTATION_ALIGNMENT,
        category="neuron alignment",
        paper=REBASIN,
        year=2023,
        kind=Kind.MODELWISE,
        needs_shared_init=False,
        min_models=2,
        params=(SEED, Param("max_iter", 100, "maximum passes of coordinate descent", low=1)),
        summary="permute hidden units to maximise the inner product of the weights (coordinate descent, "
                "one linear assignment per permutation group)",
    ),
    MethodInfo(
        name="activation_matching",
        family=Family.PERMUTATION_ALIGNMENT,
        category="neuron alignment",
        paper=REBASIN + "; Entezari et al. 2022, The Role of Permutation Invariance in Linear Mode Connectivity",
        year=2023,
        kind=Kind.MODELWISE,
        needs_data=True,
        needs_shared_init=False,
        min_models=2,
        summary="permute hidden units to maximise the correlation of their activations on data",
    ),
    MethodInfo(
        name="ste",
        family=Family.PERMUTATION_ALIGNMENT,
        category="neuron alignment",
        paper=REBASIN,
        year=2023,
        kind=Kind.MODELWISE,
        needs_data=True,
        needs_shared_init=False,
        min_models=2,
        max_models=2,
        params=(SEED, Param("steps", 20, "optimisation steps", low=1), Param("lr", 1e-3, "Adam step size", low=0.0)),
        summary="straight-through estimator: learn a proxy whose weight-matching projection of B minimises the "
                "loss at the midpoint with A",
    ),
    MethodInfo(
        name="repair",
        family=Family.PERMUTATION_ALIGNMENT,
        category="variance repair",
        paper="Jordan et al. 2023, REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
        year=2023,
        kind=Kind.MODELWISE,
        needs_data=True,
        needs_shared_init=False,
        min_models=2,
        max_models=2,
        params=(Param("alpha", 0.5, "interpolation point whose unit statistics are restored", low=0.0, high=1.0),),
        summary="after aligning and interpolating, reset each unit's mean and std to the interpolation of the "
                "endpoints' (BatchNorm networks: re-estimate the running statistics)",
    ),
)
