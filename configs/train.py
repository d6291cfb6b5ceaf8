"""``--config=configs/train.py[:preset]`` in a source checkout: the package's own config
(``tgd_jax/pet/configs/train.py``), which installed commands use."""

from tgd_jax.pet.configs.train import get_config

__all__ = ["get_config"]
