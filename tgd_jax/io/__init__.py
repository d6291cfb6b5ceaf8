"""What every command shares, the simulator's as the training runs': its files and its
process contract. Imports the TGD core's errors only (never :mod:`tgd_jax.train`,
:mod:`tgd_jax.pet` or :mod:`tgd_jax.sim`).

* :mod:`~tgd_jax.io.workdir` - atomic files, ``config.json``/``versions.json``, the lock
  that keeps a second run out of a folder in use.
* :mod:`~tgd_jax.io.readers` - what every reader of a user-named file checks.
* :mod:`~tgd_jax.io.errors` - the command-line contract: one line, a clear exit code,
  signals handled between writes.
* :mod:`~tgd_jax.io.startup` - a quiet start and the persistent compilation cache.
"""
