"""Mixture-of-experts assembly from dense models (mergekit-moe's configuration): `build_moe`."""

from merging.moe.build import MoEReport, build_moe
from merging.moe.config import Expert, MoEConfig

__all__ = ["Expert", "MoEConfig", "MoEReport", "build_moe"]
