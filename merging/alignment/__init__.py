"""Permutation alignment (Git Re-Basin family): specs, solvers, REPAIR.

Ainsworth et al. 2023 (Git Re-Basin), Entezari et al. 2022, Jordan et al. 2023 (REPAIR).
"""

from merging.alignment.activation_matching import activation_matching
from merging.alignment.apply import apply_permutation, identity_permutation, invert, random_permutation
from merging.alignment.checkpoints import align_checkpoints, align_states
from merging.alignment.infer import fx_spec, infer_spec, spec_from_hf_folder, transformer_spec
from merging.alignment.repair import repair, reset_bn_stats
from merging.alignment.spec import PermutationSpec, spec_from_groups
from merging.alignment.ste import ste_matching
from merging.alignment.weight_matching import MatchResult, alignment_objective, weight_matching

__all__ = [
    "PermutationSpec", "spec_from_groups", "infer_spec", "fx_spec", "transformer_spec", "spec_from_hf_folder",
    "apply_permutation", "random_permutation", "identity_permutation", "invert", "weight_matching",
    "activation_matching", "MatchResult", "alignment_objective", "repair", "reset_bn_stats", "align_checkpoints",
    "align_states", "ste_matching",
]
