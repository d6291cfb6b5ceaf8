"""train.py: the DnCNN from scratch on one reconstruction version (v1-net, v2-net).

Select a size with a config string: ``--config=configs/train.py:demo`` (CPU demo) or
``:tiny`` (tests); the default is the paper's network and schedule.
"""

from tgd_jax.pet.config import train_config


def get_config(preset: str = ""):
    return train_config(preset)
