"""Interpolation family: weight averaging, spherical interpolation, soups and layer stacking.

Names, parameters and defaults follow mergekit's where mergekit has the method (`linear`, `slerp`,
`nuslerp`, `multislerp`, `karcher`, `nearswap`, `arcee_fusion`, `passthrough`); the soups follow
Wortsman et al. 2022. A parameter whose default is None is required (as `t` is in mergekit).
"""

from taxonomy.core import Family, Kind, MethodInfo, Param

WEIGHT = Param("weight", 1.0, "relative weight of this model", per_model=True)
NORMALIZE = Param("normalize", True, "divide by the sum of weights")
MERGEKIT = "Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models"
IN_MERGEKIT = "as in mergekit (Goddard et al. 2024)"
SOUPS = ("Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models improves accuracy "
         "without increasing inference time")
SPHERICAL = "spherical interpolation"

ENTRIES: tuple[MethodInfo, ...] = (
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
    MethodInfo(
        name="model_soup",
        family=Family.INTERPOLATION,
        category="weight averaging",
        paper=SOUPS,
        year=2022,
        min_models=1,
        in_mergekit=False,
        summary="uniform soup: the plain average of the models (linear with equal weights)",
        aliases=("uniform_soup",),
    ),
    MethodInfo(
        name="greedy_soup",
        family=Family.INTERPOLATION,
        category="weight averaging",
        paper=SOUPS,
        year=2022,
        kind=Kind.MODELWISE,
        needs_data=True,
        min_models=1,
        in_mergekit=False,
        summary="add ingredients by decreasing held-out score, keep each only if the soup's score does not drop "
                "(merging.modelwise.soups.greedy_soup)",
    ),
    MethodInfo(
        name="slerp",
        family=Family.INTERPOLATION,
        category=SPHERICAL,
        paper="Shoemake 1985, Animating rotation with quaternion curves; " + IN_MERGEKIT,
        year=2024,
        needs_base=True,
        min_models=1,
        max_models=1,
        params=(Param("t", None, "interpolation factor: 0 gives the base model, 1 the other (required)",
                      low=0.0, high=1.0),),
        in_mergekit=True,
        summary="per tensor, spherical interpolation from the base to the other model; near-colinear "
                "tensors (|cos| > 0.9995) are interpolated linearly",
    ),
    MethodInfo(
        name="nuslerp",
        family=Family.INTERPOLATION,
        category=SPHERICAL,
        paper="Goddard 2025, NuSLERP; " + IN_MERGEKIT,
        year=2025,
        min_models=2,
        max_models=3,
        params=(
            WEIGHT,
            Param("nuslerp_flatten", True, "slerp each tensor as one flat vector; false: per row or column"),
            Param("nuslerp_row_wise", False, "without flattening: slerp the vectors along dim 0 instead of dim -1"),
        ),
        in_mergekit=True,
        summary="slerp of two models at t = w2 / (w1 + w2); with a base model, of their task vectors",
    ),
    MethodInfo(
        name="multislerp",
        family=Family.INTERPOLATION,
        category=SPHERICAL,
        paper="Goddard 2025, Multi-SLERP: barycentric interpolation on a hypersphere; " + IN_MERGEKIT,
        year=2025,
        min_models=1,
        params=(
            WEIGHT,
            Param("normalize_weights", True, "divide the weights by their sum"),
            Param("eps", 1e-8, "small constant for numerical stability", low=0.0, low_open=True),
        ),
        in_mergekit=True,
        summary="weighted spherical average of N models (or task vectors with a base) through the tangent space "
                "at their normalized weighted mean",
    ),
    MethodInfo(
        name="karcher",
        family=Family.INTERPOLATION,
        category=SPHERICAL,
        paper="Buss and Fillmore 2001, Spherical averages and applications to spherical splines and "
              "interpolation (Karcher 1977 mean); " + IN_MERGEKIT,
        year=2001,
        min_models=1,
        params=(
            Param("weight", 1.0, "relative weight of this model (basin extension; mergekit averages uniformly)",
                  per_model=True, low=0.0),
            Param("max_iter", 10, "maximum fixed-point iterations", low=0),
            Param("tol", 1e-5, "convergence tolerance on the tangent step (and on tensor norms)", low=0.0),
        ),
        in_mergekit=True,
        summary="Riemannian (Frechet) mean of the normalized tensors on the unit sphere, scaled by the mean norm",
    ),
    MethodInfo(
        name="nearswap",
        family=Family.INTERPOLATION,
        category="selective interpolation",
        paper="alchemonaut 2024, NearSwap (QuartetAnemoi-70B-t0.0001 model card); " + IN_MERGEKIT,
        year=2024,
        needs_base=True,
        min_models=1,
        max_models=1,
        params=(Param("t", None, "sameness threshold: entries closer than t take the other model's value "
                                 "(required)", low=0.0, low_open=True),),
        in_mergekit=True,
        summary="per entry, move the base toward the other model by min(1, t / |base - other|)",
    ),
    MethodInfo(
        name="arcee_fusion",
        family=Family.INTERPOLATION,
        category="selective interpolation",
        paper="Arcee AI 2025, Arcee Fusion (MergeKit v0.1 release blog); " + IN_MERGEKIT,
        year=2025,
        needs_base=True,
        min_models=1,
        max_models=1,
        in_mergekit=True,
        summary="take the other model's entries whose importance |delta| * KL(softmax rows) exceeds "
                "median + 1.5 IQR; keep the base elsewhere",
    ),
    MethodInfo(
        name="passthrough",
        family=Family.INTERPOLATION,
        category="layer stacking",
        paper=MERGEKIT,
        year=2024,
        needs_shared_init=False,
        min_models=1,
        max_models=1,
        params=(Param("scale", 1.0, "multiply the tensor by this factor (e.g. per filter)", per_model=True),),
        in_mergekit=True,
        summary="copies one model's tensors unchanged (times `scale`); builds frankenmerges from slices",
    ),
)
