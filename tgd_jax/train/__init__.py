"""The training runtime: everything between a TGD decision and a trained network.

Nothing in here knows about PET; it trains any Flax model on any dataset of input/target
pairs in the documented HDF5 schema:

* :mod:`~tgd_jax.train.config` - the ml_collections configs of the three commands.
* :mod:`~tgd_jax.train.dataset` - the HDF5 schema: writer, validating reader.
* :mod:`~tgd_jax.train.readers` - what every reader of a user-named file checks.
* :mod:`~tgd_jax.train.data` - pairs, deterministic patch batches, prefetching.
* :mod:`~tgd_jax.train.parallel` - the device mesh, sharding, jitted data-parallel steps.
* :mod:`~tgd_jax.train.step` - ``TrainState``, ``train_step``, ``eval_step``.
* :mod:`~tgd_jax.train.metrics` - ``metrics.jsonl``, progress lines, the non-finite check.
* :mod:`~tgd_jax.train.checkpoints` - orbax checkpoints (latest few and best), restore.
* :mod:`~tgd_jax.train.workdir` - atomic files, ``config.json``/``versions.json``, the
  lock that keeps a second run out of a folder in use.
* :mod:`~tgd_jax.train.trainer` - :func:`~tgd_jax.train.trainer.fit`, the loop.

It imports the TGD core (``tgd_jax.*``) and never the PET application (``tgd_jax.pet``,
``tgd_jax.sim``).
"""
