"""Interpolation family: weight averaging and spherical interpolation of models."""

from taxonomy.core import Family, MethodInfo, Param
from taxonomy.registry import register

WEIGHT = Param("weight", 1.0, "relative weight of this model", per_model=True)
NORMALIZE = Param("normalize", True, "divide by the sum of weights")

register(
    MethodInfo(
        name="linear",
        family=Family.INTERPOLATION,
        category="weight averaging",
        paper="Wortsman et al. 2022, Model soups",
        year=2022,
        min_models=1,
        params=(WEIGHT, NORMALIZE),
        in_mergekit=True,
        summary="weighted average of the models' parameters",
    ),
)
