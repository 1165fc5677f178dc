"""Stage 1, reading and writing bytes: model references, checkpoints (safetensors, Hub cache, LoRA), the shard
writer and the output guard. Knows nothing of recipes or plans."""
