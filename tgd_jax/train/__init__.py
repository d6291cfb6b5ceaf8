"""The training runtime: everything between a TGD plan and a trained network.

Nothing in here knows about PET or any dataset: it trains any Flax model whose batches
are ``{"inputs", "targets"}`` arrays, with the plan's masks, gates and BatchNorm modes:

* :mod:`~tgd_jax.train.step` - ``TrainState``, ``train_step``, ``eval_step``.
* :mod:`~tgd_jax.train.trainer` - :func:`~tgd_jax.train.trainer.fit`, the loop: batches
  from a function of the step, an evaluator, hooks, checkpoints, resume.
* :mod:`~tgd_jax.train.parallel` - the device mesh, sharding, jitted data-parallel steps,
  several processes.
* :mod:`~tgd_jax.train.prefetch` - batches made ahead on a background thread.
* :mod:`~tgd_jax.train.metrics` - ``metrics.jsonl``, progress lines, the non-finite check.
* :mod:`~tgd_jax.train.tensorboard` - TensorBoard event files without TensorFlow.
* :mod:`~tgd_jax.train.checkpoints` - orbax checkpoints (latest few and best), restore.

It imports the TGD core (``tgd_jax.*``) and the shared I/O (:mod:`tgd_jax.io`), never
the PET application (``tgd_jax.pet``) or the simulator (``tgd_jax.sim``).
"""
