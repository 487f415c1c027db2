"""The method itself, no I/O of its own: CFG math, adapters, the adapter file, the sampling loop."""
