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

PCB_PAPER = "Du et al. 2024, Parameter Competition Balancing for Model Merging"
MAGMAX_PAPER = "Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning"
CART_PAPER = "Choi et al. 2024, Revisiting Weight Averaging for Model Merging (CART)"
TALL_PAPER = "Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression"
TALL_LAMBDA = Param("tall_lambda", 0.6, "task t keeps an entry where |tau_t| > tall_lambda * |tau_MTL - tau_t| "
                                        "(the paper picks it per task in [0.2, 0.6] on validation data; "
                                        "FusionBench's default)", low=0.0)
EMR_PAPER = "Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging"
WUDI_PAPER = ("Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model "
              "Merging via Task Vectors (WUDI-merging)")

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
    MethodInfo(
        name="pcb", family=Family.TASK_ARITHMETIC, category="competition balancing", paper=PCB_PAPER, year=2024,
        needs_base=True, min_models=1,
        params=(
            Param("pcb_ratio", 0.1, "fraction of each task vector's entries kept, by balanced competition score",
                  low=0.0, high=1.0, low_open=True),
            Param("clamp_ratio", 0.0001, "fraction of each task vector's smallest and largest magnitudes clamped "
                                         "(outliers), as the authors' code", low=0.0, high=0.5),
            Param("lambda", 1.0, "scale of the merged task vector added to the base (tuned in the paper)"),
        ),
        summary="per entry: intra-balancing exp(T * minmax(|tau_i|)^2) times inter-balancing "
                "tanh(tau_i * sum_j tau_j); keep the top pcb_ratio, score-weighted mean of the task vectors",
        aliases=("pcb_merging",),
    ),
    MethodInfo(
        name="magmax", family=Family.TASK_ARITHMETIC, category="magnitude selection", paper=MAGMAX_PAPER,
        year=2024, needs_base=True, min_models=1,
        params=(Param("lambda", 0.5, "scale of the merged task vector (0.5: the authors' 8-task script, "
                                     "FusionBench's default)"),),
        summary="per entry: the task-vector entry of largest magnitude (the later model on ties): "
                "base + lambda * tau_argmax",
    ),
    MethodInfo(
        name="cart", family=Family.TASK_ARITHMETIC, category="subspace", paper=CART_PAPER, year=2024,
        needs_base=False, min_models=1,
        params=(
            Param("rank_ratio", 0.08, "fraction of min(shape) singular components kept of each centred task "
                                      "vector (the paper's optimum, about 8%)", low=0.0, high=1.0, low_open=True),
            Param("lambda", 1.0, "scale of the summed low-rank centred task vectors added to the average"),
            Param("svd", "exact", "how the leading singular triplets are found: exact (a full SVD, as FusionBench) or "
                  "lowrank (torch.svd_lowrank, seeded per tensor: faster, approximate)", choices=("exact", "lowrank")),
        ),
        summary="per matrix: task vectors centred at the weight average, each cut to its top singular "
                "components: mean + lambda * sum_i SVD_k(theta_i - mean); other tensors: the mean",
    ),
    MethodInfo(
        name="consensus_ta", family=Family.TASK_ARITHMETIC, category="consensus masks", paper=TALL_PAPER,
        year=2024, needs_base=True, min_models=1,
        params=(
            TALL_LAMBDA,
            Param("min_agreement", 2, "an entry is kept when at least this many tasks' TALL masks hold it "
                                      "(k in the paper: 1 drops the weights no task uses, 2 also the 'selfish' "
                                      "ones only one task uses)",
                  low=0.0),
            Param("lambda", 1.0, "scale of the masked multi-task vector added to the base (alpha in the paper)"),
        ),
        summary="TALL masks m_t = |tau_t| > tall_lambda |tau_MTL - tau_t| with tau_MTL = sum_t tau_t; keep the "
                "entries at least min_agreement masks hold: base + lambda * consensus * tau_MTL",
        aliases=("consensus",),
    ),
    MethodInfo(
        name="tall_masks", family=Family.TASK_ARITHMETIC, category="consensus masks", paper=TALL_PAPER,
        year=2024, needs_base=True, needs_task_identity=True, min_models=1,
        params=(TALL_LAMBDA, Param("lambda", 1.0, "scale of tau_MTL in the merged model written (task arithmetic)")),
        summary="writes base + lambda * tau_MTL and, beside it, tau_MTL and each task's TALL mask; task t "
                "(named at inference) is base + m_t * tau_MTL",
    ),
    MethodInfo(
        name="emr", family=Family.TASK_ARITHMETIC, category="sign election", paper=EMR_PAPER, year=2024,
        needs_base=True, needs_task_identity=True, min_models=1, params=(),
        summary="elect sign(sum tau) and the largest agreeing magnitude (tau_uni); beside base + tau_uni, each "
                "task's sign mask and rescaler: task t (named at inference) is base + c_t M_t * tau_uni",
        aliases=("emr_merging",),
    ),
    MethodInfo(
        name="wudi", family=Family.TASK_ARITHMETIC, category="interference minimisation", paper=WUDI_PAPER,
        year=2025, needs_base=True, min_models=1,
        params=(
            Param("iterations", 400, "Adam steps per matrix (FusionBench's default)", low=0.0, high=100000.0),
            Param("lr", 1e-5, "Adam learning rate (the authors')", low=0.0),
        ),
        summary="per matrix: Adam on sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 from sum_i tau_i (the "
                "task vectors as data proxies); other tensors: the mean task vector",
        aliases=("wudi_merging",),
    ),
)
