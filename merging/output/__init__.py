"""Stage 5, the output folder's side files: the patched config, its loadability check, tokenizer and chat
template, and the model card."""
