"""LoRA extraction: a PEFT adapter approximating a fine-tune minus its base, module by module (truncated SVD)."""

from merging.extraction.extract import ExtractionReport, extract_lora

__all__ = ["ExtractionReport", "extract_lora"]
