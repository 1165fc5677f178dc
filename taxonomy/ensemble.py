"""Output ensembling: the reference merges are compared with (not a merge)."""

from taxonomy.core import Family, Kind, MethodInfo

ENTRIES: tuple[MethodInfo, ...] = (
    MethodInfo(
        name="output_ensemble",
        family=Family.ENSEMBLE,
        category="output ensembling",
        paper="Dietterich 2000, Ensemble methods in machine learning",
        year=2000,
        kind=Kind.REFERENCE,
        needs_shared_init=False,
        min_models=2,
        summary="average of the models' output probabilities; costs N forward passes",
    ),
)
