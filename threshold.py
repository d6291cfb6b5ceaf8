r"""The paper's threshold study for any trained checkpoint: are low-KSE kernels useless?

  python threshold.py --checkpoint=runs/demo/v1net --data=runs/demo/data/train.h5 \
      --version=v1 --studies=1 --out=runs/demo/v1net/threshold

For phi = 0.1 ... 0.6, zeroes the kernels TGD would retrain (KSE < phi) and measures the
held-out loss and the change of the output, against the same per-layer counts chosen at
random and by lowest filter L1 norm. Writes threshold.json, threshold.png and kse_hist.png.
The held-out patches come from the LAST --studies studies of --data (for a v1-net trained
with val_studies=1, its held-out study).
"""

import sys

from absl import app, flags

from tgd_jax.pet import cli
from tgd_jax.pet import premise as premise_lib
from tgd_jax.train import checkpoints
from tgd_jax.train.dataset import DatasetError

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
_WHICH = flags.DEFINE_string("which", "best", "Checkpoint of the workdir: best | latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <checkpoint>/threshold).")


def main(argv: list[str]) -> None:
    cli.quiet_start()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        phis = tuple(float(p) for p in _PHIS.value)
    except ValueError as e:
        raise app.UsageError(f"--phis must be numbers: {e}") from None
    cli.quiet_libraries()
    try:
        premise_lib.threshold_checkpoint(
            _CHECKPOINT.value, _DATA.value, _OUT.value or f"{_CHECKPOINT.value}/threshold",
            version=_VERSION.value, studies=_STUDIES.value, examples=_EXAMPLES.value,
            phis=phis, random_draws=_DRAWS.value, seed=_SEED.value, which=_WHICH.value,
            log=cli.progress)
    except (DatasetError, checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"threshold.py: error: {e}")


if __name__ == "__main__":
    app.run(main)
