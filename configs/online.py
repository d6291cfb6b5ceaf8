"""``--config=configs/online.py[:preset]`` in a source checkout: the package's own config
(``tgd_jax/pet/configs/online.py``), which installed commands use."""

from tgd_jax.pet.configs.online import get_config

__all__ = ["get_config"]
