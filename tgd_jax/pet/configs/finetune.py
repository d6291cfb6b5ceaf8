"""finetune.py: FT-net (last_k), TGD-net (tgd), full fine-tuning and the random / l1 ablations.

Select a size with a config string: ``--config=configs/finetune.py:demo`` or ``:tiny``.
"""

from tgd_jax.pet.config import finetune_config


def get_config(preset: str = ""):
    return finetune_config(preset)
