r"""Denoise a 3D volume with any trained checkpoint (HDF5 or NIfTI in, HDF5 or NIfTI out).

  python denoise.py --checkpoint=runs/tgdnet --input=runs/demo/data/test.h5 \
      --study=study_000 --key=v2/realisations --output=runs/denoised.h5
  python denoise.py --checkpoint=runs/tgdnet --input=pet.nii.gz --output=pet_dn.nii.gz

NIfTI needs the optional extra: pip install 'tgd-jax[nifti]'.
"""

from pathlib import Path

from absl import flags

from tgd_jax.io import errors
from tgd_jax.pet import cli, denoise

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or checkpoint folder.",
                                  required=True)
_WHICH = flags.DEFINE_string("which", "best", "best | latest | a step number.")
_INPUT = flags.DEFINE_string("input", None, "HDF5 dataset or NIfTI (.nii, .nii.gz) volume.",
                             required=True)
_STUDY = flags.DEFINE_string("study", "", "HDF5 input: the study group (e.g. study_000).")
_KEY = flags.DEFINE_string("key", "", "HDF5 input: the image key (e.g. v2/halves/full; a "
                           "4D key such as v2/realisations takes --index).")
_INDEX = flags.DEFINE_integer("index", 0, "Which volume of a 4D HDF5 key.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .h5 (dataset 'denoised') or .nii[.gz].",
                              required=True)
_BATCH = flags.DEFINE_integer("batch_slices", 8, "Slices per network call (>= 1).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists (never the "
                               "input itself).")
flags.adopt_module_key_flags(cli)  # --verbose, --cpu_devices, the launch flags


def main(argv: list[str]) -> None:
    cli.start()
    result = None
    with cli.reported("denoise.py"):
        if len(argv) > 1:
            raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
        with cli.every_process_works() as scratch:  # several processes: 0 writes
            cli.quiet_libraries()
            output = _OUTPUT.value if scratch is None else scratch / Path(_OUTPUT.value).name
            result = denoise.denoise_file(
                _CHECKPOINT.value, _INPUT.value, output, which=_WHICH.value,
                study=_STUDY.value, key=_KEY.value, index=_INDEX.value,
                batch_slices=_BATCH.value, overwrite=_OVERWRITE.value)
            if scratch is not None:
                result = None
    if result is not None:
        cli.progress(f"wrote {result['output']}: {result['slices']} slices in "
                     f"{result['seconds']:.1f} s")


def run() -> None:
    """The console script ``tgd-denoise`` (and ``python -m tgd_jax.pet.commands.denoise``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
