"""Task arithmetic family: task vectors, sparsified and sign-elected variants, subspace merges.

Names, parameters and defaults follow mergekit's where mergekit has the method (its
generalized task arithmetic, `model_stock` and `sce`); `tsv` follows Gargiulo et al. 2025.
"""

from dataclasses import replace

from taxonomy.core import Family, MethodInfo, Param

WEIGHT = Param("weight", 1.0, "scale of this model's task vector (negative: forget the task)", per_model=True)
DENSITY = Param(
    "density", 1.0, "fraction of the task vector's entries kept", per_model=True, low=0.0, high=1.0, low_open=True
)
GAMMA = Param("gamma", 0.01, "fraction of the largest-magnitude entries removed (outliers)", per_model=True,
              low=0.0, high=1.0)
EPSILON = Param("epsilon", 0.15, "half-width of the keep-probability window around density", per_model=True,
                low=0.0, high=1.0)
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector added to the base")
INT8_MASK = Param("int8_mask", False, "accepted for mergekit compatibility; ignored (the engine merges per tensor)")
RESCALE_CHOICES = (True, False, "unbiased")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, "divide the merged task vector by the sum of the (agreeing) weights")


def _rescale(default: bool | str) -> Param:
    return Param(
        "rescale", default,
        "after dropping: true = match the task vector's L1 norm (mergekit); 'unbiased' = divide by the keep "
        "probability (the DARE/DELLA papers)",
        choices=RESCALE_CHOICES,
    )


def _gta(name: str, category: str, paper: str, year: int, summary: str, *, normalize: bool, rescale: bool,
         extra: tuple[Param, ...] = ()) -> MethodInfo:
    return MethodInfo(
        name=name, family=Family.TASK_ARITHMETIC, category=category, paper=paper, year=year, needs_base=True,
        min_models=1, params=(WEIGHT, DENSITY, *extra, LAMBDA, _normalize(normalize), _rescale(rescale), INT8_MASK),
        in_mergekit=True, summary=summary,
    )


TIES_PAPER = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models"
DARE_PAPER = ("Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch")
BREADCRUMBS_PAPER = "Davari and Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"
DELLA_PAPER = "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"

KNOTS_PAPER = "Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR 2025)"


def _knots(name: str, summary: str, extra: tuple[Param, ...], normalize: bool,
           aliases: tuple[str, ...] = ()) -> MethodInfo:
    """KnOTS: the LoRA updates of each weight put in one shared SVD basis, the task-vector method run on the
    per-task coefficients there (merging.methods.knots)."""
    return MethodInfo(
        name=name, family=Family.TASK_ARITHMETIC, category="LoRA subspace", paper=KNOTS_PAPER, year=2025,
        needs_base=True, needs_lora=True, min_models=1,
        params=(WEIGHT, *extra, LAMBDA, _normalize(normalize)), in_mergekit=False, summary=summary, aliases=aliases,
    )


RAM_PAPER = "Reinforced Agent Merging (RAM), arXiv:2601.13572, 2026"
RAM_EPSILON = Param("epsilon", 1e-5, "a task-vector entry counts as changed when |tau| > epsilon", low=0.0)

ENTRIES: tuple[MethodInfo, ...] = (
    _gta("task_arithmetic", "task vectors", "Ilharco et al. 2023, Editing Models with Task Arithmetic", 2023,
         "base + lambda * sum_i w_i (theta_i - base)", normalize=False, rescale=False),
    _gta("ties", "sign election", TIES_PAPER, 2023,
         "trim task vectors to their top-density magnitudes, elect a sign per entry, disjoint mean",
         normalize=True, rescale=False),
    _gta("dare_linear", "sparsification", DARE_PAPER, 2024,
         "drop task-vector entries at random (keep density), rescale, weighted sum", normalize=False, rescale=True),
    _gta("dare_ties", "sign election", DARE_PAPER, 2024,
         "DARE random drop and rescale, then TIES sign election", normalize=False, rescale=True),
    _gta("breadcrumbs", "sparsification", BREADCRUMBS_PAPER, 2024,
         "drop the largest gamma and the smallest entries by magnitude, keep density, weighted sum",
         normalize=False, rescale=False, extra=(GAMMA,)),
    _gta("breadcrumbs_ties", "sign election", BREADCRUMBS_PAPER, 2024,
         "Model Breadcrumbs masks, then TIES sign election", normalize=False, rescale=False, extra=(GAMMA,)),
    _gta("della", "sign election", DELLA_PAPER, 2024,
         "magnitude-ranked drop probabilities (density +- epsilon), rescale, TIES sign election",
         normalize=True, rescale=True, extra=(EPSILON,)),
    _gta("della_linear", "sparsification", DELLA_PAPER, 2024,
         "DELLA magnitude-ranked random drop and rescale, weighted sum", normalize=False, rescale=True,
         extra=(EPSILON,)),
    MethodInfo(
        name="model_stock", family=Family.TASK_ARITHMETIC, category="task vectors",
        paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models", year=2024,
        needs_base=True, min_models=2,
        params=(Param("filter_wise", False, "one interpolation ratio per row instead of per tensor"),),
        in_mergekit=True,
        summary="interpolate the fine-tunes' average toward the base by a ratio from their task vectors' angle",
    ),
    MethodInfo(
        name="sce", family=Family.TASK_ARITHMETIC, category="sign election",
        paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE: select, calculate, erase)",
        year=2024, needs_base=True, min_models=1,
        params=(
            Param("select_topk", 1.0, "fraction of entries kept, by variance across the task vectors",
                  low=0.0, high=1.0),
            INT8_MASK,
        ),
        in_mergekit=True,
        summary="keep high-variance entries, weight task vectors by mean square, erase minority signs",
    ),
    MethodInfo(
        name="ram", family=Family.TASK_ARITHMETIC, category="overlap averaging", paper=RAM_PAPER, year=2026,
        needs_base=True, min_models=1, params=(RAM_EPSILON,), in_mergekit=True,
        summary="per entry: a task-vector entry |tau_i| > epsilon kept as is if it is the only one, "
                "averaged over the contributing models where several overlap",
    ),
    MethodInfo(
        name="ramplus_tl", family=Family.TASK_ARITHMETIC, category="overlap averaging", paper=RAM_PAPER,
        year=2026, needs_base=True, min_models=1,
        params=(
            Param("r", 0.1, "gain on the unique entries per unit of rho (shared / unique entry count)"),
            Param("alpha", 0.2, "upper clamp of rho", low=0.0),
            RAM_EPSILON,
        ),
        in_mergekit=True,
        summary="RAM with each model's unique entries scaled by 1 + r * clamp(shared_i / unique_i, 0, alpha), "
                "counted per tensor",
    ),
    MethodInfo(
        name="tsv", family=Family.TASK_ARITHMETIC, category="subspace",
        paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging", year=2025,
        needs_base=True, min_models=1,
        params=(
            Param("lambda", 1.0, "scale of the merged task vector added to the base (alpha in the paper)"),
            Param("sv_reduction", 0.0,
                  "fraction of each task vector's singular components kept per matrix; 0 = 1/number of models",
                  low=0.0, high=1.0),
            Param("svd", "exact", "how the leading singular triplets are found: exact (a full SVD, as FusionBench) or "
                  "lowrank (torch.svd_lowrank, seeded per tensor: faster, approximate)", choices=("exact", "lowrank")),
        ),
        in_mergekit=False,
        summary="per matrix: low-rank SVD of each task vector, orthogonalise the concatenated singular vectors",
        aliases=("tsv_merge",),
    ),
    # defaults of the authors' ViT-B/32 configs (configs/vitB_r16_knots_*.py): TIES keeps the top 20%, DARE drops
    # 10% and divides by the keep probability, both elect signs and take the disjoint mean; their lambda (0.6, 0.7)
    # is tuned per benchmark on validation data, so lambda stays 1 here
    _knots("knots_ta", "LoRA updates in a shared SVD basis, coefficients summed: exactly task arithmetic of the "
           "updates", (), normalize=False),
    _knots("knots_ties", "LoRA updates in a shared SVD basis (U S [V_1 .. V_n]^T), TIES on the coefficients S V_i^T",
           (replace(DENSITY, default=0.2), _rescale(False)), normalize=True),
    _knots("knots_dare", "LoRA updates in a shared SVD basis, DARE drop and rescale then TIES sign election on the "
           "coefficients S V_i^T", (replace(DENSITY, default=0.9), _rescale("unbiased")), normalize=True,
           aliases=("knots_dare_ties",)),
)
