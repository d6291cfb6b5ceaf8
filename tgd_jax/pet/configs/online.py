"""online.py: noise-2-noise TGD on one study (TGD_N2N-net, TGD^2_N2N-net), phi = 0.4.

Select a size with a config string: ``--config=configs/online.py:demo`` or ``:tiny``.
"""

from tgd_jax.pet.config import online_config


def get_config(preset: str = ""):
    return online_config(preset)
