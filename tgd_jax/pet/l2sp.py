r"""The strength of the L2-SP baseline, chosen on the fine-tuning studies only.

L2-SP (Li, Grandvalet and Davoine, ICML 2018) fine-tunes every weight with the penalty
``(strength / 2) * ||w - w0||^2`` toward the pretrained kernels ``w0``
(:func:`tgd_jax.optim.kernel_l2_sp`). Like TGD it needs no old data, so its strength may
not be chosen on the old task either: as in the L2-SP paper, it is chosen by validation on
the TARGET task. Each candidate fine-tunes the same pretrained network on the fine-tuning
studies with the last one held out (``finetune.py --method=full
--config.optimizer.l2_sp=<s> --config.data.val_studies=1``, one workdir per candidate,
named by the strength); the strength with the lowest held-out loss wins.

  python -m tgd_jax.pet.l2sp --folder=runs/study/l2sp-select

reads ``<folder>/<strength>/summary.json`` of every candidate and writes
``<folder>/strength.json`` (every candidate's loss and the choice) and
``<folder>/strength.flags``, an absl flag file that gives the chosen strength to
``finetune.py --flagfile=...``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import app, flags

from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import UsageError

__all__ = ["candidate_losses", "choose_strength", "write_choice"]


def candidate_losses(folder: str | Path) -> dict[float, float]:
    """Strength -> best held-out loss of every candidate workdir under ``folder`` (a
    sub-folder whose name is a number and that holds ``summary.json``).

    Raises:
      UsageError: no candidate, or a candidate whose summary is unreadable or has no finite
        ``best_val_loss`` (the file is named).
    """
    losses: dict[float, float] = {}
    for sub in sorted(Path(folder).iterdir() if Path(folder).is_dir() else ()):
        try:
            strength = float(sub.name)
        except ValueError:
            continue
        path = sub / "summary.json"
        try:
            loss = float(json.loads(path.read_text())["best_val_loss"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path}: no best_val_loss ({error}); rerun that candidate's "
                             "fine-tuning") from None
        if not math.isfinite(loss):
            raise UsageError(f"{path}: best_val_loss is {loss}")
        losses[strength] = loss
    if not losses:
        raise UsageError(f"{folder}: no candidate workdirs (sub-folders named by their "
                         "strength, each with summary.json)")
    return losses


def choose_strength(losses: Mapping[float, float]) -> float:
    """The strength with the lowest held-out loss; a tie goes to the stronger penalty (it
    keeps more of the pretrained network for the same fit of the new task)."""
    if not losses:
        raise UsageError("no candidate strengths")
    return min(losses, key=lambda s: (losses[s], -s))


def write_choice(folder: str | Path) -> dict[str, Any]:
    """Chooses from the candidates under ``folder`` and writes ``strength.json`` and
    ``strength.flags`` there (atomically). Returns what ``strength.json`` holds."""
    folder = Path(folder)
    losses = candidate_losses(folder)
    chosen = choose_strength(losses)
    record = {"rule": "lowest held-out loss on the held-out fine-tuning study",
              "losses": {f"{s:g}": v for s, v in sorted(losses.items())},
              "strength": chosen}
    workdir_lib.write_json(folder / "strength.json", record)
    workdir_lib.atomic_write_bytes(folder / "strength.flags",
                                   f"--config.optimizer.l2_sp={chosen!r}\n".encode())
    return record


def _main(argv: list[str]) -> None:
    from tgd_jax.pet import cli

    with cli.reported("python -m tgd_jax.pet.l2sp"):
        if len(argv) > 1:
            raise UsageError(f"unexpected arguments: {argv[1:]}")
        record = write_choice(flags.FLAGS.folder)
        for s, loss in record["losses"].items():
            print(f"l2_sp={s}: held-out loss {loss:.6f}"
                  + ("  <- chosen" if float(s) == record["strength"] else ""))


if __name__ == "__main__":
    from tgd_jax.pet import cli as _cli  # defines --verbose before the flags are parsed

    flags.DEFINE_string("folder", None, "Folder of the candidate workdirs.", required=True)
    app.run(_main, flags_parser=_cli.parse_flags)
