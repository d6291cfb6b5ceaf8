r"""Is TGD's premise real? The pretraining-recipe and fine-tuning sweep behind the README.

  python experiments/premise.py --out=runs/premise --data=runs/demo/data          # all stages
  python experiments/premise.py --out=runs/premise --stages=pretrain --seeds=0    # one stage

Stages (each run is one workdir under ``--out``; finished runs are skipped, so the command
resumes where it stopped):

1. ``pretrain``: DnCNNs on the v1 images of ``train.h5`` for every recipe of
   :data:`RECIPES` (regulariser kind and strength, schedule, width) and seed.
2. ``threshold``: the threshold study of every pretrained network
   (:mod:`tgd_jax.threshold`): retrained fraction at phi 0.1-0.6 and the held-out loss
   with those kernels zeroed, against the same counts at random and by L1 norm.
3. ``finetune``: every fine-tuning method at two learning rates from the networks of
   :data:`FINETUNE_RECIPES`, on the v2 images of ``finetune.h5``; new-task loss on the
   held-out study of ``train.h5`` (v2), old-task loss on the same study (v1), and the
   cosine between TGD's gated gradient and the true gradient.
4. ``report``: ``premise.md`` (tables, mean +- sd over seeds) and figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from tgd_jax.train import parallel  # noqa: E402

_OUT = flags.DEFINE_string("out", "runs/premise", "Folder for every run and the report.")
_DATA = flags.DEFINE_string("data", "runs/demo/data", "Folder of the simulator's datasets "
                            "(train.h5, finetune.h5), e.g. from `make demo`.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every run.")
_STAGES = flags.DEFINE_list("stages", ["pretrain", "threshold", "finetune", "report"],
                            "Stages to run, in order.")
_RECIPES = flags.DEFINE_list("recipes", [], "Only these pretraining recipes (default: all).")

PRETRAIN_STEPS = 1200
#: name -> config overrides of configs/train.py:demo. "l2" is the coupled regulariser (a
#: loss term, through Adam), "wd" decoupled weight decay (AdamW, lr * wd * w per step).
RECIPES: dict[str, dict[str, object]] = {
    "none-const": {"optimizer.schedule": "constant"},
    "none-cos": {},
    "l2-1e-4-cos": {"optimizer.l2": 1e-4},
    "l2-1e-3-cos": {"optimizer.l2": 1e-3},
    "l2-1e-2-cos": {"optimizer.l2": 1e-2},
    "l2-1e-3-const": {"optimizer.l2": 1e-3, "optimizer.schedule": "constant"},
    "wd-1e-1-cos": {"optimizer.name": "adamw", "optimizer.weight_decay": 1e-1},
    "wd-1-cos": {"optimizer.name": "adamw", "optimizer.weight_decay": 1.0},
    # the exploratory setting of the issue that found the premise: 4,000 constant-lr steps
    "l2-1e-3-const-4k": {"optimizer.l2": 1e-3, "optimizer.schedule": "constant",
                         "num_steps": 4000, "eval_every": 1000},
    "none-cos-w375": {"model.width_multiplier": 0.375},
    "l2-1e-3-cos-w375": {"optimizer.l2": 1e-3, "model.width_multiplier": 0.375},
}
BASE = {"optimizer.schedule": "cosine", "num_steps": PRETRAIN_STEPS, "eval_every": 400,
        "log_every": 200, "eval_batches": 16}


def pretrain_config(recipe: str, seed: int, data: Path):
    from tgd_jax.pet import config as config_lib

    c = config_lib.train_config("demo")
    c.optimizer.l2 = 0.0
    c.optimizer.schedule = "cosine"
    config_lib.override(c, **{**BASE, **RECIPES[recipe], "seed": seed,
                              "data.path": str(data / "train.h5"), "data.version": "v1"})
    return c


def run_pretrain(out: Path, data: Path, recipes: list[str], seeds: list[int]) -> None:
    from tgd_jax.pet import pipeline

    todo = [(s, r) for s in seeds for r in recipes]
    t0 = time.perf_counter()
    for i, (seed, recipe) in enumerate(todo):
        workdir = out / "pretrain" / f"{recipe}-s{seed}"
        if (workdir / "summary.json").exists():
            continue
        summary = pipeline.train(pretrain_config(recipe, seed, data), workdir, log=_quiet)
        elapsed = time.perf_counter() - t0
        print(f"[pretrain {i + 1}/{len(todo)}] {recipe} seed {seed}: held-out "
              f"{summary['best_val_loss']:.5g}, {elapsed / 60:.1f} min", flush=True)


#: Networks fine-tuned in stage 3: without a regulariser, and the candidate recipe (chosen
#: after the seed-0 threshold studies: lowest held-out loss, most kernels below 0.3, and
#: the largest gap between zeroing KSE's choice and a random one).
CANDIDATE = "l2-1e-2-cos"
FINETUNE_RECIPES = ("none-cos", CANDIDATE)
FINETUNE_STEPS = 300
#: name -> overrides of configs/finetune.py:demo. "gate_cosine" logs TGD's gradient cosine.
METHODS: dict[str, dict[str, object]] = {
    "tgd-paper": {"method": "tgd", "tgd.mode": "paper", "tgd.gate_cosine": True},
    "tgd-projected": {"method": "tgd", "tgd.mode": "projected", "tgd.gate_cosine": True},
    "tgd-paper-runbn": {"method": "tgd", "tgd.mode": "paper", "tgd.frozen_bn": "running"},
    "tgd-projected-runbn": {"method": "tgd", "tgd.mode": "projected",
                            "tgd.frozen_bn": "running"},
    # hypothesis test: the frozen last conv reads the retrained maps with small weights
    "tgd-projected-lasttrain": {"method": "tgd", "tgd.mode": "projected", "tgd.last": "train"},
    "last_k": {"method": "last_k"},
    "full": {"method": "full"},
    "random": {"method": "random", "tgd.mode": "paper"},
}
LEARNING_RATES = (1e-3, 1e-4)
#: (recipe, method) pairs fine-tuned; the unregularised network gets the TGD modes and full.
FINETUNE_GRID = [(r, m) for r in FINETUNE_RECIPES for m in METHODS
                 if r == CANDIDATE or m in ("tgd-paper", "tgd-projected", "full")]


def _in_grid(recipe: str, method: str, lr: float) -> bool:
    """What 2 CPU cores afford: every method at both rates from the candidate, the two TGD
    modes at 1e-3 from the unregularised network (the frozen-BN option in paper mode only)."""
    if method == "tgd-projected-runbn":
        return False
    if method == "tgd-projected-lasttrain":
        return recipe == CANDIDATE and lr == 1e-4
    if recipe != CANDIDATE:
        return lr == 1e-3 and method in ("tgd-paper", "tgd-projected")
    return lr == 1e-3 or method not in ("random", "tgd-paper-runbn")


def finetune_config(recipe: str, method: str, lr: float, seed: int, out: Path, data: Path):
    from tgd_jax.pet import config as config_lib

    c = config_lib.finetune_config("demo")
    config_lib.override(c, **{
        **METHODS[method], "seed": seed, "num_steps": FINETUNE_STEPS, "eval_every": 50,
        "log_every": 10, "eval_batches": 16, "optimizer.learning_rate": lr,
        "checkpoint": str(out / "pretrain" / f"{recipe}-s{seed}"),
        "data.path": str(data / "finetune.h5"),
        # new task: the v2 images of the study v1-net never trained on; old task: its v1
        "validation.path": str(data / "train.h5"), "validation.version": "v2",
        "old_task.path": str(data / "train.h5"), "old_task.version": "v1"})
    return c


def run_finetune(out: Path, data: Path, seeds: list[int]) -> None:
    from tgd_jax.pet import pipeline

    todo = [(s, r, m, lr) for lr in LEARNING_RATES for s in seeds for r, m in FINETUNE_GRID
            if _in_grid(r, m, lr)]
    t0 = time.perf_counter()
    for i, (seed, recipe, method, lr) in enumerate(todo):
        workdir = out / "finetune" / f"{recipe}-s{seed}" / f"{method}-lr{lr:g}"
        if (workdir / "summary.json").exists():
            continue
        if not (out / "pretrain" / f"{recipe}-s{seed}" / "summary.json").exists():
            print(f"[finetune] {recipe} seed {seed} is not pretrained yet; skipped", flush=True)
            continue
        summary = pipeline.finetune(finetune_config(recipe, method, lr, seed, out, data), workdir,
                                log=_quiet)
        print(f"[finetune {i + 1}/{len(todo)}] {recipe} s{seed} {method} lr {lr:g}: new "
              f"{summary['initial_val_loss']:.4g} -> {summary['final_val_loss']:.4g}, old "
              f"{summary['initial_val_loss_old']:.4g} -> {summary['final_val_loss_old']:.4g}"
              f", {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def run_threshold(out: Path, data: Path, recipes: list[str], seeds: list[int]) -> None:
    from tgd_jax.pet import premise

    for recipe in recipes:
        for seed in seeds:
            workdir = out / "pretrain" / f"{recipe}-s{seed}"
            if (workdir / "threshold" / "threshold.json").exists():
                continue
            if not (workdir / "summary.json").exists():
                print(f"[threshold] {recipe} seed {seed} is not pretrained yet; skipped")
                continue
            premise.threshold_checkpoint(str(workdir), str(data / "train.h5"),
                                         workdir / "threshold", version="v1", studies=1,
                                         examples=256, seed=0, log=_quiet)
            print(f"[threshold] {recipe} seed {seed} done", flush=True)


def _quiet(message: str) -> None:
    if "validation" in message or "error" in message:
        print("   ", message, flush=True)


def main(argv: list[str]) -> None:
    del argv
    parallel.use_cpu_cores(16, None, default=1)  # $TGD_CPU_DEVICES, else 1 device
    out, data = Path(_OUT.value), Path(_DATA.value)
    seeds = [int(s) for s in _SEEDS.value]
    recipes = _RECIPES.value or list(RECIPES)
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise app.UsageError(f"unknown recipes {unknown}; have {list(RECIPES)}")
    out.mkdir(parents=True, exist_ok=True)
    for stage in _STAGES.value:
        if stage == "pretrain":
            run_pretrain(out, data, recipes, seeds)
        elif stage == "threshold":
            run_threshold(out, data, recipes, seeds)
        elif stage == "finetune":
            run_finetune(out, data, seeds)
        elif stage == "report":
            from experiments import premise_report

            premise_report.write(out, seeds, recipes=recipes, grid=FINETUNE_GRID,
                                 lrs=LEARNING_RATES, pretrain_steps=PRETRAIN_STEPS,
                                 finetune_steps=FINETUNE_STEPS)
        else:
            raise app.UsageError(f"unknown stage {stage!r}")


if __name__ == "__main__":
    app.run(main)
