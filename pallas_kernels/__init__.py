"""Accelerator kernels of m1-jax, each beside its pure-JAX reference."""
