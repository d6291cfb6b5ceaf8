r"""BatchNorm in fine-tuning: which statistics should channels use while they are fine-tuned?

  python experiments/bn_options.py --data=runs/long/data --out=runs/bn_options

At the ``study`` preset's scale (its datasets: 12 + 1 training and 4 fine-tuning studies
of 16 slices; ``python -m tgd_jax.sim --role=train --studies=13 --slices=16`` and
``--role=finetune --studies=4 --slices=16``), for 3 seeds:

1. ``pretrain``: v1-net as the study trains it (quarter width, 3,000 steps, the default
   recipe), on the v1 images of ``train.h5`` (its last study held out).
2. ``finetune``: TGD-net (phi 0.3, projected), FT-net (``last_k``) and full fine-tuning
   on the v2 images of ``finetune.h5`` (500 steps, Adam 1e-4), with each BatchNorm option:

   * ``batch``: every channel normalises with the batch's statistics in training passes
     (frozen channels keep their running statistics, which no longer match);
   * ``frozen-running``: frozen channels normalise with their running statistics (the
     library's default), retrained ones with the batch's;
   * ``all-running``: every BatchNorm in inference mode; no statistic changes.

   Full fine-tuning freezes nothing, so its ``batch`` and ``frozen-running`` are one run.
3. ``report``: ``bn_options.md`` and ``bn_options.json``: new task (v2) and old task (v1)
   held-out losses of the held-out training study, change from the start, mean ± sd over
   seeds. Finished runs are skipped, so the command resumes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from tgd_jax.train import parallel  # noqa: E402

_OUT = flags.DEFINE_string("out", "runs/bn_options", "Folder for every run and the report.")
_DATA = flags.DEFINE_string("data", "runs/long/data", "Folder with train.h5 and finetune.h5 "
                            "at the study preset's scale.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every run.")
_STAGES = flags.DEFINE_list("stages", ["pretrain", "finetune", "report"], "Stages to run.")

PRETRAIN_STEPS, FINETUNE_STEPS = 3000, 500
#: option -> (frozen_bn, retrained_bn)
OPTIONS = {"batch": ("batch", "batch"), "frozen-running": ("running", "batch"),
           "all-running": ("running", "running")}
METHODS = {"TGD-net": {"method": "tgd", "tgd.phi": 0.3, "tgd.mode": "projected"},
           "FT-net": {"method": "last_k"}, "full": {"method": "full"}}


def _grid() -> list[tuple[str, str]]:
    return [(m, o) for m in METHODS for o in OPTIONS if not (m == "full" and o == "batch")]


def run_pretrain(out: Path, data: Path, seeds: list[int]) -> None:
    from tgd_jax.pet import config as config_lib
    from tgd_jax.pet import pipeline

    for seed in seeds:
        workdir = out / f"v1net-s{seed}"
        if (workdir / "summary.json").exists():
            continue
        c = config_lib.override(config_lib.train_config("demo"), **{
            "seed": seed, "num_steps": PRETRAIN_STEPS, "eval_every": 500,
            "data.path": str(data / "train.h5"), "data.version": "v1"})
        summary = pipeline.train(c, workdir, log=_quiet)
        print(f"[pretrain] seed {seed}: held-out {summary['best_val_loss']:.5g}", flush=True)


def run_finetune(out: Path, data: Path, seeds: list[int]) -> None:
    from tgd_jax.pet import config as config_lib
    from tgd_jax.pet import pipeline

    todo = [(s, m, o) for s in seeds for m, o in _grid()]
    t0 = time.perf_counter()
    for i, (seed, method, option) in enumerate(todo):
        workdir = out / f"s{seed}" / f"{method}-{option}"
        if (workdir / "summary.json").exists():
            continue
        frozen_bn, retrained_bn = OPTIONS[option]
        c = config_lib.override(config_lib.finetune_config("demo"), **{
            **METHODS[method], "seed": seed, "num_steps": FINETUNE_STEPS, "eval_every": 50,
            "tgd.frozen_bn": frozen_bn, "tgd.retrained_bn": retrained_bn,
            "checkpoint": str(out / f"v1net-s{seed}"), "data.path": str(data / "finetune.h5"),
            "validation.path": str(data / "train.h5"), "validation.version": "v2",
            "old_task.path": str(data / "train.h5"), "old_task.version": "v1"})
        s = pipeline.finetune(c, workdir, log=_quiet)
        print(f"[finetune {i + 1}/{len(todo)}] s{seed} {method} {option}: new "
              f"{s['initial_val_loss']:.4g} -> {s['final_val_loss']:.4g}, old "
              f"{s['initial_val_loss_old']:.4g} -> {s['final_val_loss_old']:.4g}, "
              f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.1f} %"
    return f"{np.mean(values):+.1f} ± {np.std(values, ddof=1):.1f} %"


def report(out: Path, seeds: list[int]) -> dict:
    rows = {}
    for method, option in _grid():
        new, old = [], []
        for seed in seeds:
            path = out / f"s{seed}" / f"{method}-{option}" / "summary.json"
            if not path.exists():
                continue
            s = json.loads(path.read_text())
            new.append(100 * (s["final_val_loss"] / s["initial_val_loss"] - 1))
            old.append(100 * (s["final_val_loss_old"] / s["initial_val_loss_old"] - 1))
        rows[f"{method}/{option}"] = {"new": new, "old": old}
    lines = ["# BatchNorm in fine-tuning", "",
             "`python experiments/bn_options.py` (the study preset's data as simulated before "
             "2026-12-01, with the sparse-lesion recipe, and its v1-net recipe, "
             f"{PRETRAIN_STEPS} pretraining and {FINETUNE_STEPS} fine-tuning steps, Adam 1e-4). "
             "Change of the inference-mode held-out loss of the held-out training study from "
             "the start to the end of fine-tuning, mean ± sd over seeds "
             f"{', '.join(map(str, seeds))}. New task: its v2 images; old task: its v1 images.",
             "", "| method | BatchNorm | seeds | new task (v2) | old task (v1) |",
             "|---|---|---|---|---|"]
    for key, r in rows.items():
        method, option = key.split("/")
        lines.append(f"| {method} | {option} | {len(r['new'])} | {_ms(r['new'])} | "
                     f"{_ms(r['old'])} |")
    (out / "bn_options.md").write_text("\n".join(lines) + "\n")
    (out / "bn_options.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return rows


def _quiet(message: str) -> None:
    if "error" in message:
        print("   ", message, flush=True)


def main(argv: list[str]) -> None:
    del argv
    parallel.use_cpu_cores(16, None, default=1)  # $TGD_CPU_DEVICES, else 1 device
    out, data = Path(_OUT.value), Path(_DATA.value)
    seeds = [int(s) for s in _SEEDS.value]
    out.mkdir(parents=True, exist_ok=True)
    for stage in _STAGES.value:
        if stage == "pretrain":
            run_pretrain(out, data, seeds)
        elif stage == "finetune":
            run_finetune(out, data, seeds)
        elif stage == "report":
            report(out, seeds)
        else:
            raise app.UsageError(f"unknown stage {stage!r}")


if __name__ == "__main__":
    app.run(main)
