"""Two runs' networks compared leaf by leaf: every checkpoint (``best/``, ``checkpoints/``,
``kept/``) of every workdir under RUN_A against the same one under RUN_B, bit for bit
(params, BatchNorm statistics, optimizer state and step).

    python experiments/compare_checkpoints.py runs/demo runs/demo-again

Prints one line per checkpoint and a total; exits 1 if any leaf differs or a checkpoint of
one run is missing from the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

FOLDERS = ("best", "checkpoints", "kept")


def checkpoints(run: Path) -> list[Path]:
    """Every complete checkpoint step folder under ``run``, relative to it."""
    return sorted(step.relative_to(run) for folder in FOLDERS for parent in run.rglob(folder)
                  if parent.is_dir() for step in parent.iterdir()
                  if step.name.isdigit() and (step / "state").is_dir())


def leaves(step: Path) -> dict[str, np.ndarray]:
    """The checkpoint's arrays by path, read without a template."""
    tree = ocp.PyTreeCheckpointer().restore(step.resolve() / "state")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(a: str, b: str) -> int:
    run_a, run_b = Path(a), Path(b)
    found_a, found_b = checkpoints(run_a), checkpoints(run_b)
    bad = 0
    for missing in sorted(set(found_a) ^ set(found_b)):
        print(f"only in {run_a if missing in found_a else run_b}: {missing}")
        bad += 1
    arrays = 0
    for step in sorted(set(found_a) & set(found_b)):
        one, two = leaves(run_a / step), leaves(run_b / step)
        differ = sorted(k for k in one.keys() | two.keys() if k not in one or k not in two
                        or one[k].dtype != two[k].dtype or one[k].shape != two[k].shape
                        or one[k].tobytes() != two[k].tobytes())
        arrays += len(one)
        bad += bool(differ)
        print(f"{step}: {len(one)} arrays, " + (f"DIFFER: {differ[:5]}" if differ
                                                else "bit-identical"))
    print(f"{len(set(found_a) & set(found_b))} checkpoints, {arrays} arrays compared, "
          f"{bad} differ or missing")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
