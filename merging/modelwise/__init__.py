"""Model-level merges that need whole models or data (Fisher, RegMean, greedy soup, in-memory state dicts),
as opposed to the streamed tensorwise methods of `merging.methods`."""
