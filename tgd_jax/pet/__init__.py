"""The PET application: the paper's experiments on top of the TGD core and the runtime.

* :mod:`~tgd_jax.pet.models` - the paper's 2.5D DnCNN and ``model_from_config``.
* :mod:`~tgd_jax.pet.pipeline` - the experiments behind ``train.py``, ``finetune.py`` and
  ``online.py`` (pretrain; fine-tune with TGD or a baseline; online noise-2-noise TGD).
* :mod:`~tgd_jax.pet.denoise` - whole volumes through a trained network; NIfTI/HDF5 I/O.
* :mod:`~tgd_jax.pet.evaluate` - lesion bias and liver noise over i.i.d. realisations.
* :mod:`~tgd_jax.pet.premise` - threshold studies of checkpoints, KSE figures.
* :mod:`~tgd_jax.pet.cli` - what the command-line programs share.

The simulator that makes the data is :mod:`tgd_jax.sim`, beside this package.
"""
