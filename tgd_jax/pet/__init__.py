"""The PET application: the paper's experiments on top of the TGD core and the runtime.

* :mod:`~tgd_jax.pet.dataset` - the HDF5 schema the simulator writes: writer, validating
  reader.
* :mod:`~tgd_jax.pet.data` - input/target pairs, deterministic 2.5D patch batches.
* :mod:`~tgd_jax.pet.config` - the ml_collections configs of the commands, presets.
* :mod:`~tgd_jax.pet.models` - the paper's 2.5D DnCNN and ``model_from_config``.
* :mod:`~tgd_jax.pet.training` - a run on PET pairs through the generic loop, with
  the slice panel.
* :mod:`~tgd_jax.pet.pipeline` - the experiments behind ``train.py``, ``finetune.py`` and
  ``online.py`` (pretrain; fine-tune with TGD or a baseline; online noise-2-noise TGD).
* :mod:`~tgd_jax.pet.denoise` - whole volumes through a trained network; NIfTI/HDF5 I/O.
* :mod:`~tgd_jax.pet.evaluate` - lesion bias and liver noise over i.i.d. realisations.
* :mod:`~tgd_jax.pet.premise` - threshold studies of checkpoints, KSE figures.
* :mod:`~tgd_jax.pet.cli` - what the command-line programs share.

The simulator that makes the data is :mod:`tgd_jax.sim`, beside this package.
"""
