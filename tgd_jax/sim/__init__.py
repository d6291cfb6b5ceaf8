"""The built-in PET study simulator (docs/simulator.md).

Pipeline, one module each: :mod:`phantom` (truth) -> :mod:`projector` (matched system
matrix; fine data model) -> :mod:`acquisition` (expected data, Poisson, thinning) ->
:mod:`recon` (OSEM v1/v2) -> :mod:`study` (one study end to end) -> :mod:`generate` (roles,
presets) -> :mod:`report` (measured properties); :mod:`cache` keeps the count calibration
on disk across processes. The files are written in the HDF5 schema
of :mod:`tgd_jax.pet.dataset`, which also reads and validates them. Command line:
``python -m tgd_jax.sim``.
"""
