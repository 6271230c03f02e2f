"""Checkpoint I/O below the model, without JAX: lazy safetensors / PyTorch readers, the key table that maps
checkpoint keys onto model parameters, read planning, the records of a converted directory (manifest,
checksums), the on-disk Orbax layout that ``m1 convert`` writes and loading and export read, host buffers,
and what kind of checkpoint a path holds."""
