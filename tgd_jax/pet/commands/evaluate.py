r"""The paper's test metrics (lesion ensemble bias, liver CoV) for several networks.

  python evaluate.py --test=runs/demo/data/test.h5 --out=runs/demo/evaluation \
      --net=v1-net=runs/demo/v1net --net=TGD-net=runs/demo/tgdnet

Writes evaluation.json, evaluation.md (the headline and the original lesion with each
network's gain over the Gaussian post-filter at the same liver CoV, then every lesion),
examples.npz (one realisation's slice through each study's lesion, per network),
examples.png and gain.png (the Gaussian curve and the gain per lesion size) into --out.
"""

from pathlib import Path

import numpy as np
from absl import flags

from tgd_jax.io import errors
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import cli
from tgd_jax.pet import evaluate as evaluate_lib

_TEST = flags.DEFINE_string("test", "runs/demo/data/test.h5", "A 'test' dataset (HDF5).")
_NETS = flags.DEFINE_multi_string("net", [], "NAME=WORKDIR of a network to evaluate "
                                  "(repeat the flag).")
_VERSION = flags.DEFINE_string("version", "v2", "Reconstruction version of the test images.")
_WHICH = flags.DEFINE_string("which", "best", "Checkpoint of each workdir: best | latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier evaluation in --out.")

#: What an evaluation writes into --out.
OUTPUTS = ("evaluation.json", "evaluation.md", "examples.npz", "examples.png", "gain.png")
flags.adopt_module_key_flags(cli)  # --verbose, --cpu_devices, the launch flags


def main(argv: list[str]) -> None:
    cli.start()
    text = None
    with cli.reported("evaluate.py"):
        if len(argv) > 1:
            raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
        networks = parse_nets(_NETS.value)
        with cli.every_process_works() as scratch:  # several processes: 0 writes
            text = _evaluate(networks, _OUT.value if scratch is None else scratch / "out")
            if scratch is not None:
                text = None
    if text is not None:
        print(text)


def _evaluate(networks: dict[str, str], folder: str | Path) -> str:
    """Evaluates ``networks`` and writes the files into ``folder``; returns the table."""
    with workdir_lib.output_folder(folder) as out:  # before any work
        earlier = [name for name in OUTPUTS if (out / name).exists()]
        if earlier and not _OVERWRITE.value:
            raise errors.UsageError(f"{out}: holds an earlier evaluation ({', '.join(earlier)}); "
                                    "choose another --out, or pass --overwrite to replace it")
        cli.quiet_libraries()
        result = evaluate_lib.evaluate(_TEST.value, networks, version=_VERSION.value,
                                       which=_WHICH.value)
    examples = result.pop("examples")
    # make_parent=False: a --out removed during the evaluation is an error, not a new
    # folder holding only the files written after that
    workdir_lib.write_json(out / "evaluation.json", result, make_parent=False)
    text = evaluate_lib.table(result["rows"])
    every = evaluate_lib.lesion_table(result["rows"])
    workdir_lib.atomic_write_bytes(out / "evaluation.md", (text + "\n\nEvery lesion:\n\n"
                                                          + every + "\n").encode(),
                                   make_parent=False)
    with workdir_lib.atomic_path(out / "examples.npz", suffix=".npz",
                                 make_parent=False) as tmp:
        np.savez_compressed(tmp, **examples)
    evaluate_lib.figure(examples, out / "examples.png", make_parent=False)
    evaluate_lib.gain_figure(result, out / "gain.png", make_parent=False)
    return text


def parse_nets(items: list[str]) -> dict[str, str]:
    """``["A=runs/a", ...]`` -> ``{"A": "runs/a"}``; refuses malformed and repeated names."""
    networks: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise errors.UsageError(f"--net expects NAME=WORKDIR, got {item!r}")
        if name in networks:
            raise errors.UsageError(f"--net name {name!r} is given twice ({networks[name]} "
                                    f"and {path}); names label the rows, so they must differ")
        if name == "input":
            raise errors.UsageError("--net name 'input' is taken by the un-denoised input row")
        networks[name] = path
    return networks


def run() -> None:
    """The console script ``tgd-evaluate`` (and ``python -m tgd_jax.pet.commands.evaluate``)."""
    errors.run_command(__name__, main, cli.parse_flags)


if __name__ == "__main__":
    run()
