"""Checkpoint I/O below the model, without JAX: lazy safetensors / PyTorch readers, the key table that maps
checkpoint keys onto model parameters, read planning, the records of a converted directory, host buffers."""
