r"""The paper's test metrics (lesion ensemble bias, liver CoV) for several networks.

  python evaluate.py --test=runs/demo/data/test.h5 --out=runs/demo/evaluation \
      --net=v1-net=runs/demo/v1net --net=TGD-net=runs/demo/tgdnet

Writes evaluation.json, evaluation.md (a table) and examples.png into --out.
"""

import sys

from absl import app, flags

from tgd_jax.pet import cli
from tgd_jax.pet import evaluate as evaluate_lib
from tgd_jax.train import checkpoints
from tgd_jax.train import workdir as workdir_lib
from tgd_jax.train.dataset import DatasetError

_TEST = flags.DEFINE_string("test", "runs/demo/data/test.h5", "A 'test' dataset (HDF5).")
_NETS = flags.DEFINE_multi_string("net", [], "NAME=WORKDIR of a network to evaluate "
                                  "(repeat the flag).")
_VERSION = flags.DEFINE_string("version", "v2", "Reconstruction version of the test images.")
_WHICH = flags.DEFINE_string("which", "best", "Checkpoint of each workdir: best | latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)


def main(argv: list[str]) -> None:
    cli.quiet_start()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    networks = {}
    for item in _NETS.value:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--net expects NAME=WORKDIR, got {item!r}")
        networks[name] = path
    cli.quiet_libraries()
    try:
        result = evaluate_lib.evaluate(_TEST.value, networks, version=_VERSION.value,
                                       which=_WHICH.value)
    except (DatasetError, checkpoints.CheckpointError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    examples = result.pop("examples")
    workdir_lib.write_json(f"{_OUT.value}/evaluation.json", result)
    text = evaluate_lib.table(result["rows"])
    workdir_lib.atomic_write_bytes(f"{_OUT.value}/evaluation.md", (text + "\n").encode())
    evaluate_lib.figure(examples, f"{_OUT.value}/examples.png")
    print(text)


if __name__ == "__main__":
    app.run(main)
