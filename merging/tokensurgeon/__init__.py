"""Tokenizer transplant (mergekit-tokensurgeon): give a model a donor's tokenizer, `token_surgery`."""

from merging.tokensurgeon.build import METHODS, SurgeryReport, token_surgery

__all__ = ["METHODS", "SurgeryReport", "token_surgery"]
