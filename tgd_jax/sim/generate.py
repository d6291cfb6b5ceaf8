"""Dataset recipes for the paper's four roles, and the ``demo`` / ``paper`` presets.

* ``train``: v1-net / v2-net training set: studies of mixed BMI, each with a 600 s/bed
  target and inputs at the paper's six count levels, in both versions; the ``oncology``
  recipe (several lesions and other small hot structures per study).
* ``finetune``: the few low-BMI studies for FT-net / TGD-net, v2 only; ``oncology`` too.
* ``test``: studies with an 8-10 mm liver lesion: a 600 s reference, R i.i.d. 60 s
  realisations (ensemble bias, liver CoV) and a noiseless reconstruction, both versions.
* ``online``: one study with out-of-distribution features (hot bladder, catheter): a 120 s
  scan split into two 60 s noise-2-noise halves.

Study ``i`` of a training set with seed ``s`` is simulated from ``fold_in(key(s), i)``; the
other roles each have a stream of their own (:func:`study_key`), so no role repeats another
role's patients.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import jax

from tgd_jax.errors import UsageError
from tgd_jax.pet.dataset import write_dataset
from tgd_jax.sim.recon import VERSIONS
from tgd_jax.sim.study import SimConfig, Study, simulate_study, simulation_key

__all__ = ["PAPER_LEVELS", "RoleSpec", "PRESETS", "ROLE_STREAMS", "study_key", "make_study",
           "generate_role",
           "spec_from_args", "describe"]

#: The paper's input count levels, s/bed (the target is 600 s/bed).
PAPER_LEVELS: tuple[float, ...] = (30, 45, 60, 90, 120, 180)


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How to make one dataset."""

    role: str
    n_studies: int
    n_slices: int
    high_bmi_fraction: float = 0.5
    versions: tuple[str, ...] = ("v1", "v2")
    levels: tuple[float, ...] = PAPER_LEVELS
    realisations: int = 0
    ood: bool = False
    recipe: str = "sparse"  # what each study holds (tgd_jax.sim.phantom.RECIPES)
    lesions: str = "single"  # test lesions (tgd_jax.sim.phantom.LESION_SETS)
    # train / finetune: also store the reconstruction of the expected (noise-free) 600 s
    # data, a target no scanner gives (the ceiling of experiments/levers.py); test and
    # online datasets always hold it. It draws no random numbers: every other image of
    # the file is the same with it or without it.
    noiseless: bool = False


#: Dataset sizes per role (``python -m tgd_jax.sim --preset``).
PRESETS: dict[str, dict[str, RoleSpec]] = {
    "demo": {
        "train": RoleSpec("train", 4, 8, recipe="oncology"),
        "finetune": RoleSpec("finetune", 2, 8, high_bmi_fraction=0.0, versions=("v2",),
                             recipe="oncology"),
        "test": RoleSpec("test", 1, 8, high_bmi_fraction=0.0, levels=(), realisations=10,
                         lesions="graded"),
        "online": RoleSpec("online", 1, 8, high_bmi_fraction=0.0, versions=("v2",), levels=(),
                           ood=True),
    },
    "paper": {
        "train": RoleSpec("train", 20, 32, recipe="oncology"),
        "finetune": RoleSpec("finetune", 7, 32, high_bmi_fraction=0.0, versions=("v2",),
                             recipe="oncology"),
        "test": RoleSpec("test", 2, 32, levels=(), realisations=10, lesions="graded"),
        "online": RoleSpec("online", 1, 32, high_bmi_fraction=0.0, versions=("v2",),
                           levels=(), ood=True),
    },
}


def _bmi(i: int, n: int, high_fraction: float) -> str:
    return "high" if i < round(high_fraction * n) else "low"


#: Each role draws its studies from its own random stream, so that no study of one role is
#: another role's patient: with one stream, study ``i`` of every role had the same key, and a
#: test study with the same BMI class as a training or fine-tuning study of the same index
#: was that patient again (measured: the same phantom up to the inserted lesion). ``train``
#: keeps the original stream, so training sets are unchanged.
ROLE_STREAMS: dict[str, int | None] = {"train": None, "finetune": 1, "test": 2, "online": 3}


def study_key(role: str, index: int, seed: int) -> jax.Array:
    """The key of study ``index`` of ``role``: ``fold_in(key(seed), index)`` for ``train``,
    a stream of its own for every other role."""
    key = simulation_key(seed)
    stream = ROLE_STREAMS[role]
    if stream is not None:
        key = jax.random.fold_in(key, 1_000_000 + stream)  # far from any study index
    return jax.random.fold_in(key, index)


def make_study(spec: RoleSpec, index: int, seed: int, config: SimConfig) -> Study:
    """Study ``index`` of a dataset: fully determined by (spec, index, seed, config)."""
    if spec.role not in ROLE_STREAMS:
        raise UsageError(f"unknown role {spec.role!r}")
    key = study_key(spec.role, index, seed)
    common = dict(bmi=_bmi(index, spec.n_studies, spec.high_bmi_fraction),
                  versions=spec.versions, ood=spec.ood, recipe=spec.recipe,
                  lesion_set=spec.lesions)
    if spec.role in ("train", "finetune"):
        study = simulate_study(key, config, levels=spec.levels, noiseless=spec.noiseless,
                               **common)
    elif spec.role == "test":
        study = simulate_study(key, config, realisations=spec.realisations, noiseless=True,
                               liver_lesion=True, levels=spec.levels, **common)
    elif spec.role == "online":
        study = simulate_study(key, config, halves_seconds=120.0, noiseless=True, **common)
    else:
        raise UsageError(f"unknown role {spec.role!r}")
    study.attrs.update(study_seed=seed, study_index=index)
    return study


def recipe_of(spec: RoleSpec, seed: int, config: SimConfig | None = None) -> dict[str, Any]:
    """Everything that determines a role's dataset: its spec, seed and simulator config."""
    config = config or SimConfig(n_slices=spec.n_slices)
    fields = dataclasses.asdict(spec)
    if not fields["noiseless"]:  # (files written before the field existed stay "the same")
        del fields["noiseless"]
    return json.loads(json.dumps({"spec": fields, "seed": seed,
                                  "sim_config": config.to_dict()}, sort_keys=True,
                                 default=str))


def stored_recipe(path: str | Path) -> dict[str, Any] | None:
    """The ``recipe`` attribute of an existing dataset (None if it has none or is not one)."""
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get("recipe")
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


def generate_role(
    spec: RoleSpec,
    out: str | Path,
    *,
    seed: int,
    config: SimConfig | None = None,
    progress: Callable[[str], None] = print,
) -> Path:
    """Simulates every study of a role and writes the HDF5 file atomically."""
    config = config or SimConfig(n_slices=spec.n_slices)
    studies: list[Study] = []
    t0 = time.perf_counter()
    for i in range(spec.n_studies):
        studies.append(make_study(spec, i, seed, config))
        elapsed = time.perf_counter() - t0
        eta = elapsed / (i + 1) * (spec.n_studies - i - 1)
        progress(f"[{spec.role}] study {i + 1}/{spec.n_studies} "
                 f"({studies[-1].attrs['bmi_class']} BMI) done, {elapsed:.0f} s, ETA {eta:.0f} s")
    recon: dict[str, Any] = {v: VERSIONS[v].to_dict() for v in spec.versions}
    return write_dataset(
        out, studies, role=spec.role, versions=spec.versions, levels_s=spec.levels,
        sim_config=config.to_dict(), recon_settings=recon, seed=seed,
        realisations=spec.realisations,
        voxel_size_mm=(config.slice_mm, config.recon_pixel_mm, config.recon_pixel_mm),
        recipe=recipe_of(spec, seed, config),
    )


def spec_from_args(preset: str, role: str, **overrides: Any) -> RoleSpec:
    """The preset's spec for a role, with any non-None field overridden."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; have {sorted(PRESETS)}")
    spec = PRESETS[preset][role]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(spec, **changes)


def describe(specs: Sequence[RoleSpec]) -> str:
    return "; ".join(f"{s.role}: {s.n_studies} x {s.n_slices} slices" for s in specs)
