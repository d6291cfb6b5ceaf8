r"""Train the 2.5D DnCNN from scratch on one reconstruction version (v1-net / v2-net).

  python train.py --workdir=runs/v1net --config=configs/train.py:demo \
      --config.data.path=runs/demo/data/train.h5 --config.data.version=v1

Noise-adaptive: every count level of each study is an input, its 600 s image the target.
Every field of the config can be overridden with --config.<field>=<value>.
"""


from absl import app, flags
from ml_collections import config_flags

from tgd_jax.io import errors
from tgd_jax.pet import cli, pipeline

_WORKDIR = cli.workdir_flag()
flags.adopt_module_key_flags(cli)  # --helpshort lists --workdir too
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(cli.CONFIGS / "train.py"),
    "Config file (configs/train.py[:paper|demo|tiny]); override fields with "
    "--config.<field>=<value>.", lock_config=True)


def main(argv: list[str]) -> None:
    cli.start()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run("train.py", pipeline.train, _CONFIG.value, _WORKDIR.value)


def run() -> None:
    """The console script ``tgd-train`` (and ``python -m tgd_jax.pet.commands.train``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
