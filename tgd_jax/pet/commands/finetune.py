r"""Fine-tune a trained network on a new task: TGD, FT-net (last_k), full, random, l1.

  python finetune.py --workdir=runs/tgdnet --config=configs/finetune.py:demo \
      --checkpoint=runs/v1net --method=tgd --phi=0.3

Writes mask.json (the retrained channels, per-layer KSE values, the retrained fraction)
and kse_hist.png before training starts.
"""


from absl import app, flags
from ml_collections import config_flags

from tgd_jax.io import errors
from tgd_jax.methods import METHODS
from tgd_jax.pet import cli, pipeline

_WORKDIR = cli.workdir_flag()
flags.adopt_module_key_flags(cli)  # --helpshort lists --workdir too
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(cli.CONFIGS / "finetune.py"),
    "Config file (configs/finetune.py[:paper|demo|tiny]); override fields with "
    "--config.<field>=<value>.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Workdir (or checkpoints/ or best/ folder) of the network to start "
    "from; its architecture and intensity scale are used. Same as --config.checkpoint.")
_METHOD = flags.DEFINE_enum(
    "method", None, list(METHODS), "tgd: retrain channels with KSE < phi; last_k: the last "
    "--config.last_k conv blocks (FT-net); full: everything; random / l1: as many channels "
    "per layer as tgd, chosen at random / by lowest filter L1 norm. Same as --config.method.")
_PHI = flags.DEFINE_float(
    "phi", None, "KSE threshold in [0, 1] (tgd, random, l1). Same as --config.tgd.phi.")


def main(argv: list[str]) -> None:
    cli.start()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    cli.apply_shortcuts(config, checkpoint=_CHECKPOINT.value, method=_METHOD.value,
                        **{"tgd.phi": _PHI.value})
    cli.run("finetune.py", pipeline.finetune, config, _WORKDIR.value)


def run() -> None:
    """The console script ``tgd-finetune`` (and ``python -m tgd_jax.pet.commands.finetune``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
