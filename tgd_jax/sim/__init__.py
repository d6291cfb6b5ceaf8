"""The built-in PET study simulator (see SIMULATION.md and README).

Pipeline, one module each: :mod:`phantom` (truth) -> :mod:`projector` (matched system
matrix; fine data model) -> :mod:`acquisition` (expected data, Poisson, thinning) ->
:mod:`recon` (OSEM v1/v2) -> :mod:`study` (one study end to end) -> :mod:`generate` (roles,
presets) -> :mod:`dataset` (HDF5 schema, validation) -> :mod:`report` (measured properties).
Command line: ``python -m tgd_jax.sim``.
"""
