"""Adaptive merging (task arithmetic family): merge coefficients learned at test time.

Yang et al. 2024 (AdaMerging, ICLR): theta = theta_0 + sum_i lambda_i tau_i, the coefficients
learned by minimising the Shannon entropy of the merged model's predictions on unlabeled test
inputs of every task (each task's inputs through its own head), with Adam, from 0.3, clamped to
[0, 1]. Task-wise: one lambda per task; layer-wise: one per task per parameter tensor (as
FusionBench's layer-wise implementation). They run over whole models and data
(merging.modelwise.adamerging), not per tensor, so `basin merge` refuses them.
"""

from taxonomy.core import Family, Kind, MethodInfo, Param

CATEGORY = "learned coefficients"
PAPER = "Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning"
PARAMS = (
    Param("init", 0.3, "initial coefficient of every task vector (the paper's and FusionBench's 0.3)",
          low=0.0, high=1.0),
    Param("lr", 1e-3, "Adam learning rate (FusionBench's default)", low=0.0, low_open=True),
    Param("steps", 100, "Adam steps (the paper runs 500, FusionBench 1000, at CLIP scale)", low=0.0),
    Param("batch_size", 16, "unlabeled inputs per task per step (FusionBench's default)", low=1.0),
    Param("clamp", True, "clamp the coefficients to [0, 1] after every step (the paper's code)"),
)

ENTRIES: tuple[MethodInfo, ...] = tuple(
    MethodInfo(
        name=name,
        family=Family.TASK_ARITHMETIC,
        category=CATEGORY,
        paper=PAPER,
        year=2024,
        kind=Kind.MODELWISE,
        needs_base=True,
        needs_data=True,
        needs_test_inputs=True,
        min_models=1,
        params=PARAMS,
        summary=summary,
    )
    for name, summary in (
        ("adamerging_task", "task arithmetic with one coefficient per task, learned by entropy minimisation on "
                            "unlabeled test inputs"),
        ("adamerging_layer", "task arithmetic with one coefficient per task per parameter tensor, learned by entropy "
                             "minimisation on unlabeled test inputs"),
    )
)
