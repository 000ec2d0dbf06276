"""The torch runner's family: `runner` (CUDA graphs, several batches in flight), `imaging` (nvJPEG decode),
`decode_queue` (one thread gathers waiting requests' JPEGs into one call) and `pipelining` (the slot
pipeline, torch-free). Importing this package imports no torch: only `runner` and `imaging` do."""
