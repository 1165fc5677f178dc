"""Importance-weighted averaging (interpolation family): averages weighted per parameter by data.

Matena and Raffel 2022 (Fisher merging), Jin et al. 2023 (RegMean), Nguyen et al. 2025 (RegMean++).
These run over whole models and data (merging.modelwise.data_aware), not per tensor.
"""

from taxonomy.core import Family, Kind, MethodInfo, Param

CATEGORY = "importance-weighted averaging"

ENTRIES: tuple[MethodInfo, ...] = (
    MethodInfo(
        name="fisher",
        family=Family.INTERPOLATION,
        category=CATEGORY,
        paper="Matena and Raffel 2022, Merging Models with Fisher-Weighted Averaging",
        year=2022,
        kind=Kind.MODELWISE,
        needs_data=True,
        min_models=2,
        params=(Param("weight", 1.0, "relative weight of this model", per_model=True, low=0.0),
                Param("eps", 1e-8, "added to every Fisher entry", low=0.0)),
        summary="per parameter entry, average weighted by the diagonal empirical Fisher of each model",
        aliases=("fisher_merging",),
    ),
    MethodInfo(
        name="regmean",
        family=Family.INTERPOLATION,
        category=CATEGORY,
        paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models",
        year=2023,
        kind=Kind.MODELWISE,
        needs_data=True,
        min_models=2,
        params=(Param("alpha", 0.9, "scale of the Gram matrices' off-diagonal entries", low=0.0, high=1.0),),
        summary="per Linear layer, the closed-form least-squares merge from the inputs' Gram matrices; "
                "other parameters averaged",
    ),
    MethodInfo(
        name="regmean_plusplus",
        family=Family.INTERPOLATION,
        category=CATEGORY,
        paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for "
              "Model Merging",
        year=2025,
        kind=Kind.MODELWISE,
        needs_data=True,
        min_models=2,
        params=(Param("alpha", 0.9, "scale of the Gram matrices' off-diagonal entries", low=0.0, high=1.0),),
        summary="RegMean, block by block in forward order, each block's Gram matrices taken on the inputs that the "
                "already merged earlier blocks produce from each model's data",
        aliases=("regmean++",),
    ),
)
