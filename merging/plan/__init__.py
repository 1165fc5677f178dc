"""Stage 3, the plan: from a recipe and the opened checkpoints' headers, the inputs' architecture checks, the
vocabulary plan and the per-tensor plan the engine executes."""
