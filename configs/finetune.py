"""``--config=configs/finetune.py[:preset]`` in a source checkout: the package's own config
(``tgd_jax/pet/configs/finetune.py``), which installed commands use."""

from tgd_jax.pet.configs.finetune import get_config

__all__ = ["get_config"]
