r"""Noise-2-noise online learning on ONE study with TGD (TGD_N2N-net, TGD^2_N2N-net).

  python online.py --workdir=runs/online --config=configs/online.py:demo \
      --checkpoint=runs/tgdnet --config.data.path=runs/demo/data/online.h5

Trains half A -> half B and B -> A of a 120 s scan (phi = 0.4, 150 epochs by default; KSE
is recomputed on the given network), then writes the denoised full-count image to
denoised.h5 and a comparison figure to online.png.
"""


from absl import app, flags
from ml_collections import config_flags

from tgd_jax.io import errors
from tgd_jax.methods import METHODS
from tgd_jax.pet import cli, pipeline

_WORKDIR = cli.workdir_flag()
flags.adopt_module_key_flags(cli)  # --helpshort lists --workdir too
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(cli.CONFIGS / "online.py"),
    "Config file (configs/online.py[:paper|demo|tiny]); override fields with "
    "--config.<field>=<value>.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Workdir of the network to start from (v2-net -> TGD_N2N-net, "
    "TGD-net -> TGD^2_N2N-net). Same as --config.checkpoint.")
_STUDY = flags.DEFINE_string(
    "study", None, "Study group of the online dataset to learn on (default: the first). "
    "Same as --config.data.study.")
_METHOD = flags.DEFINE_enum("method", None, list(METHODS), "Same as --config.method "
                            "(default tgd).")
_PHI = flags.DEFINE_float("phi", None, "KSE threshold (default 0.4). Same as "
                          "--config.tgd.phi.")


def main(argv: list[str]) -> None:
    cli.start()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    cli.apply_shortcuts(config, checkpoint=_CHECKPOINT.value, method=_METHOD.value,
                        **{"tgd.phi": _PHI.value, "data.study": _STUDY.value})
    cli.run("online.py", pipeline.online, config, _WORKDIR.value)


def run() -> None:
    """The console script ``tgd-online`` (and ``python -m tgd_jax.pet.commands.online``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
