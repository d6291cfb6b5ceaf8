"""The command lines, one module per command (absl flags and ``main``): each runs as
``python -m tgd_jax.pet.commands.<name>``, as the console script ``tgd-<name>`` of an
installed package, and as ``python <name>.py`` from a source checkout (thin wrappers)."""
