"""Subcommands of the ``m1`` command line (see :mod:`m1_jax.cli`)."""
