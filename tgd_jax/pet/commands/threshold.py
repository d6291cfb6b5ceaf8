r"""The paper's threshold study for any trained checkpoint: are low-KSE kernels useless?

  python threshold.py --checkpoint=runs/demo/v1net --data=runs/demo/data/train.h5 \
      --version=v1 --studies=1 --out=runs/demo/v1net/threshold

For phi = 0.1 ... 0.6, zeroes the kernels TGD would retrain (KSE < phi) and measures the
held-out loss and the change of the output, against the same per-layer counts chosen at
random and by lowest filter L1 norm. Writes threshold.json, threshold.png and kse_hist.png.
The held-out patches come from the LAST --studies studies of --data (for a v1-net trained
with val_studies=1, its held-out study).
"""

from collections.abc import Callable
from pathlib import Path

from absl import flags

from tgd_jax.io import errors
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import cli
from tgd_jax.pet import premise as premise_lib
from tgd_jax.train import checkpoints

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir (or checkpoint folder) of "
                                  "the network.", required=True)
_DATA = flags.DEFINE_string("data", None, "HDF5 dataset with held-out studies.",
                            required=True)
_VERSION = flags.DEFINE_string("version", "v1", "Reconstruction version of the images.")
_STUDIES = flags.DEFINE_integer("studies", 1, "Use the last N studies of --data.")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Fixed held-out 2.5D patches.")
_PHIS = flags.DEFINE_list("phis", ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"], "Thresholds.")
_DRAWS = flags.DEFINE_integer("random_draws", 3, "Random choices per phi.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the patches and the random choices.")
_COMBINE = flags.DEFINE_enum("combine", "max", ["max", "mean", "min"], "How a map read by "
                             "several layers combines their KSE values (graphs with skips).")
_WHICH = flags.DEFINE_string("which", "best", "Checkpoint of the workdir: best | latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <checkpoint>/threshold).")
flags.adopt_module_key_flags(cli)  # --verbose, --cpu_devices, the launch flags


def main(argv: list[str]) -> None:
    cli.start()
    with cli.reported("threshold.py"):
        if len(argv) > 1:
            raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            phis = tuple(float(p) for p in _PHIS.value)
        except ValueError as e:
            raise errors.UsageError(f"--phis must be numbers: {e}") from None
        if not phis:
            raise errors.UsageError("--phis is empty; give the thresholds to study, e.g. "
                                    "--phis=0.1,0.3,0.5")
        for name, flag, low in (("examples", _EXAMPLES, 1), ("random_draws", _DRAWS, 1),
                                ("studies", _STUDIES, 1)):
            if flag.value < low:
                raise errors.UsageError(f"--{name} must be >= {low}, got {flag.value}")
        checkpoints.resolve(_CHECKPOINT.value, _WHICH.value)  # exists, before making <out>
        with cli.every_process_works() as scratch:  # several processes: 0 writes
            _threshold(phis, (_OUT.value or f"{_CHECKPOINT.value}/threshold")
                       if scratch is None else scratch / "threshold",
                       cli.progress if scratch is None else lambda message: None)


def _threshold(phis: tuple[float, ...], folder: str | Path, log: Callable[[str], None]
               ) -> None:
    with workdir_lib.output_folder(folder) as out:
        cli.quiet_libraries()
        premise_lib.threshold_checkpoint(
            _CHECKPOINT.value, _DATA.value, out, version=_VERSION.value,
            studies=_STUDIES.value, examples=_EXAMPLES.value, phis=phis,
            random_draws=_DRAWS.value, seed=_SEED.value, which=_WHICH.value,
            combine=_COMBINE.value, log=log)


def run() -> None:
    """The console script ``tgd-threshold`` (and ``python -m tgd_jax.pet.commands.threshold``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
