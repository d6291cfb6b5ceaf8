r"""Generate simulated PET datasets, or report their measured properties.

    python -m tgd_jax.sim --preset=demo --out=data/demo           # all four roles
    python -m tgd_jax.sim --preset=paper --role=train --out=data/paper
    python -m tgd_jax.sim --report --out=data/demo                 # docs/simulator.md checks

Each role is written to ``<out>/<role>.h5`` (atomically); the report prints the measured
properties, writes ``<out>/report.json`` and ``<out>/examples.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from tgd_jax.io import errors, startup
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet.dataset import ROLES
from tgd_jax.sim import generate

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", sorted(generate.PRESETS),
                  "Dataset sizes: 'demo' (CPU, minutes) or 'paper' (the paper's scale).")
flags.DEFINE_list("role", list(ROLES), "Roles to generate: train, finetune, test, online.")
flags.DEFINE_string("out", "data/demo", "Output folder: <out>/<role>.h5.")
flags.DEFINE_integer("seed", 0, "Dataset seed; study i uses fold_in(key(seed), i).")
flags.DEFINE_integer("studies", None, "Override the preset's number of studies.")
flags.DEFINE_integer("slices", None, "Override the preset's slices per study.")
flags.DEFINE_float("high_bmi_fraction", None, "Override the fraction of high-BMI studies.")
flags.DEFINE_list("versions", None, "Override the reconstruction versions (v1, v2).")
flags.DEFINE_list("levels", None, "Override the input count levels, s/bed.")
flags.DEFINE_integer("realisations", None, "Override the number of 60 s realisations.")
flags.DEFINE_bool("ood", None, "Override: add out-of-distribution features.")
flags.DEFINE_enum("recipe", None, ["sparse", "oncology"], "Override what each study holds: "
                  "sparse (0-3 lesions) or oncology (several lesions, nodes, ureters, bowel).")
flags.DEFINE_enum("lesions", None, ["single", "graded"], "Override the test lesions: single "
                  "(one 8-10 mm liver lesion) or graded (plus 6-22 mm liver and soft-tissue "
                  "spheres at 4:1, docs/simulator.md).")
flags.DEFINE_bool("noiseless", None, "Override (train, finetune): also store each version's "
                  "noiseless reconstruction, <v>/noiseless (test and online files always "
                  "hold it); the other images are the same with it or without it.")
flags.DEFINE_bool("overwrite", False, "Replace an existing <out>/<role>.h5 that holds another "
                  "dataset (one holding this very dataset, same spec and seed, is kept and "
                  "not simulated again).")
flags.DEFINE_bool("verbose", False, "On an error, show the traceback instead of one line.")
flags.DEFINE_bool("report", False, "Measure the docs/simulator.md properties of <out> instead.")


def main(argv: list[str]) -> None:
    startup.quiet_start()
    startup.use_compilation_cache()
    with errors.reported("python -m tgd_jax.sim", verbose=FLAGS.verbose):
        if len(argv) > 1:
            raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
        _main(Path(FLAGS.out))


def _main(out: Path) -> None:
    if FLAGS.report:
        from tgd_jax.sim import report

        report.main(out)
        return
    unknown = sorted(set(FLAGS.role) - set(ROLES))
    if unknown:
        raise errors.UsageError(f"unknown role(s) {unknown}; choose from {ROLES}")
    levels = None
    if FLAGS.levels:
        try:
            levels = tuple(float(v) for v in FLAGS.levels)
        except ValueError:
            raise errors.UsageError(
                f"--levels must be numbers of s/bed, got {FLAGS.levels}") from None
        if any(not 0 < v <= 600 for v in levels):
            raise errors.UsageError(f"--levels must lie in (0, 600] s/bed, got {FLAGS.levels}")
    for name, value, low in (("studies", FLAGS.studies, 1), ("slices", FLAGS.slices, 2),
                             ("realisations", FLAGS.realisations, 2)):
        if value is not None and value < low:
            raise errors.UsageError(f"--{name} must be >= {low}, got {value}"
                                    + (" (the network reads 3 neighbouring slices)"
                                       if name == "slices" else ""))
    if FLAGS.high_bmi_fraction is not None and not 0 <= FLAGS.high_bmi_fraction <= 1:
        raise errors.UsageError(
            f"--high_bmi_fraction must be in [0, 1], got {FLAGS.high_bmi_fraction}")
    specs = [
        generate.spec_from_args(
            FLAGS.preset, role, n_studies=FLAGS.studies, n_slices=FLAGS.slices,
            high_bmi_fraction=FLAGS.high_bmi_fraction,
            versions=tuple(FLAGS.versions) if FLAGS.versions else None,
            levels=levels, realisations=FLAGS.realisations, ood=FLAGS.ood,
            recipe=FLAGS.recipe, lesions=FLAGS.lesions,
            noiseless=FLAGS.noiseless if role in ("train", "finetune") else None)
        for role in FLAGS.role
    ]
    workdir_lib.check_writable(out)  # before hours of simulation
    todo = []
    for spec in specs:  # every existing file judged before any simulation
        path = out / f"{spec.role}.h5"
        if path.is_dir():
            raise errors.UsageError(f"{path}: is a folder; the dataset would be written there")
        if not path.exists() or FLAGS.overwrite:
            todo.append(spec)
        elif generate.stored_recipe(path) == generate.recipe_of(spec, FLAGS.seed):
            print(f"kept {path}: it holds this very dataset (same spec and seed)", flush=True)
        else:
            raise errors.UsageError(
                f"{path}: exists and holds another dataset (or one made before datasets "
                "recorded their recipe); choose another --out, or pass --overwrite to "
                "replace it")
    print(f"preset {FLAGS.preset}: {generate.describe(todo) or 'nothing to simulate'} -> "
          f"{out}/", flush=True)
    t0 = time.perf_counter()
    for spec in todo:
        path = generate.generate_role(spec, out / f"{spec.role}.h5", seed=FLAGS.seed,
                                      progress=lambda m: print(m, flush=True))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


def run() -> None:
    """The console script ``tgd-sim`` (and ``python -m tgd_jax.sim``)."""
    errors.run_command(__name__, main)


if __name__ == "__main__":
    run()
