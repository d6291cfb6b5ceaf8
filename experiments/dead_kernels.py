r"""Where can TGD learn? Fine-tuning from a network whose low-KSE kernels are dead, and from
one where they are small but alive, with the options the paper leaves open.

  python experiments/dead_kernels.py --runs=runs/long --out=runs/dead_kernels

Starting points: the long pretrainings of ``experiments/premise_training.py``
(``<runs>/seed<s>/kept/<step>``) at ``--converged`` (default 32,000: the low-KSE kernels
have decayed to nothing) and ``--alive`` (default 6,000: small but alive), for each seed.
From each, ``finetune.py`` (demo config, projected TGD at phi 0.3, Adam 1e-4, 300 steps) on
the v2 images of the fine-tuning set, with:

* ``tgd``: TGD as it is (the default);
* ``reinit``: what TGD retrains re-drawn first (He-normal, BatchNorm reset);
* ``readers``: the input slices of frozen filters that read retrained maps retrained too;
* ``readers-last``: only the last layer's slices;
* ``reinit+readers``: both, at Adam 1e-4 and (``reinit+readers-lr1e-3``) 1e-3, the rate
  fresh kernels may need;
* ``packnet``: the PackNet-style baseline: the 30 % smallest weights of each kernel freed
  and trained from their (small) values; PackNet zeroes them first, `tgd.reinit_scale` > 0 would;
* ``random``: TGD's per-layer counts at random; ``full``: every weight;
* ``v1-control``: every weight, on the v1 images of the training studies but the held-out
  one (the old task, the data v1-net was trained on): how much a mid-schedule start
  improves under any low-rate training.

``--study=runs/study`` starts instead from the v1-nets of ``reproduce.py --preset=study``
at the END of their schedule (the last checkpoint, where the held-out loss has settled), on
that study's datasets, and adds ``l2sp`` (every weight, pulled toward the pretrained
kernels with the strength the study chose on its fine-tuning studies).

New task: the v2 images of the training set's held-out study; old task: its v1 images. The
report gives, per start and option, the change of each held-out loss from the starting
network's (mean ± sd over seeds) and the retrained share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

_RUNS = flags.DEFINE_string("runs", "runs/long", "The long pretrainings (seed<s>/kept/).")
_OUT = flags.DEFINE_string("out", "runs/dead_kernels", "Output folder.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_CONVERGED = flags.DEFINE_integer("converged", 32000, "Step of the converged start.")
_ALIVE = flags.DEFINE_integer("alive", 6000, "Step of the start whose kernels are alive.")
_STEPS = flags.DEFINE_integer("steps", 300, "Fine-tuning steps.")
_STAGES = flags.DEFINE_list("stages", ["finetune", "report"], "Stages to run.")
_OPTIONS = flags.DEFINE_list("options", None, "Options to run (default: all of OPTIONS).")
_STUDY = flags.DEFINE_string("study", "", "Instead of --runs: the output folder of "
                             "`reproduce.py --preset=study`; the starts are its v1-nets at the "
                             "END of their schedule (the last checkpoint), on its datasets, and "
                             "the L2-SP baseline runs with the strength it chose.")

#: option -> finetune.py overrides (on top of the demo config, projected TGD at phi 0.3)
OPTIONS: dict[str, dict[str, object]] = {
    "tgd": {},
    "reinit": {"tgd.reinit_scale": 1.0},
    "readers": {"tgd.readers": "all"},
    "readers-last": {"tgd.readers": "last"},
    "reinit+readers": {"tgd.reinit_scale": 1.0, "tgd.readers": "all"},
    "reinit+readers-lr1e-3": {"tgd.reinit_scale": 1.0, "tgd.readers": "all",
                              "optimizer.learning_rate": 1e-3},
    "packnet": {"method": "packnet", "tgd.packnet_fraction": 0.3},
    "random": {"method": "random"},
    "full": {"method": "full"},
    # L2-SP: every weight, pulled toward the pretrained kernels (--study only: the strength
    # the study chose on the fine-tuning studies, <study>/l2sp-select/strength.json)
    "l2sp": {"method": "full", "optimizer.l2_sp": "<chosen>"},
    # Control: the same steps on the OLD task's images, every
    # weight trained. A start taken mid-schedule improves under any low-rate training; this
    # shows how much of a change is that, not the new task.
    # (v1 of the training studies but the held-out one: the fine-tuning set has only v2).
    "v1-control": {"method": "full", "data.path": "train.h5", "data.version": "v1",
                  "data.val_studies": 1},
}
REPO = Path(__file__).resolve().parent.parent


#: The start of --study: the last checkpoint of the study's v1-net (its schedule's end).
END = "end"


def _checkpoint(runs: Path, seed: int, step: int | str) -> Path:
    if step == END:
        return runs / f"v1net-s{seed}"
    return runs / f"seed{seed}" / "kept" / str(step)


def _chosen_l2sp(runs: Path) -> float | None:
    path = runs / "l2sp-select" / "strength.json"
    return json.loads(path.read_text())["strength"] if path.exists() else None


def _argv(runs: Path, out: Path, seed: int, step: int | str, option: str) -> list[str]:
    data = runs / "data"
    overrides = {"tgd.mode": "projected", "tgd.phi": 0.3, "method": "tgd",
                 **OPTIONS[option]}
    if overrides.get("optimizer.l2_sp") == "<chosen>":
        overrides["optimizer.l2_sp"] = _chosen_l2sp(runs)
    if step == END:
        overrides["checkpoint_which"] = "latest"
    train_set = data / str(overrides.pop("data.path", "finetune.h5"))
    return ["finetune.py", f"--workdir={out / f'start{step}' / f's{seed}' / option}",
            "--config=configs/finetune.py:demo",
            f"--config.checkpoint={_checkpoint(runs, seed, step)}",
            f"--config.data.path={train_set}", f"--config.seed={seed}",
            f"--config.num_steps={_STEPS.value}", "--config.eval_every=100",
            f"--config.validation.path={data / 'train.h5'}", "--config.validation.version=v2",
            f"--config.old_task.path={data / 'train.h5'}", "--config.old_task.version=v1",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def finetune(runs: Path, out: Path, seeds: list[int], starts: list[int]) -> None:
    # Seed by seed, so that a cut-short run has whole seeds.
    todo = [(s, step, o) for s in seeds for step in starts for o in _options()]
    t0 = time.perf_counter()
    for i, (seed, step, option) in enumerate(todo):
        workdir = out / f"start{step}" / f"s{seed}" / option
        if (workdir / "summary.json").exists():
            continue
        # a study's v1-net counts once it has finished (summary.json), not mid-schedule
        ready = _checkpoint(runs, seed, step) / ("summary.json" if step == END else "")
        if not ready.exists():
            print(f"[{i + 1}/{len(todo)}] seed {seed} has no checkpoint at {step} yet", flush=True)
            continue
        if option == "l2sp" and _chosen_l2sp(runs) is None:
            print(f"[{i + 1}/{len(todo)}] no L2-SP strength chosen in {runs} yet", flush=True)
            continue
        argv = [sys.executable, *_argv(runs, out, seed, step, option)]
        log = out / "logs" / f"start{step}-s{seed}-{option}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            # One CPU device per run, as the published numbers (and one run per core).
            env = {**os.environ,
                   "TGD_CPU_DEVICES": os.environ.get("TGD_CPU_DEVICES", "1")}
            subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True,
                           env=env)
        s = json.loads((workdir / "summary.json").read_text())
        print(f"[{i + 1}/{len(todo)}] start {step} s{seed} {option}: new "
              f"{s['initial_val_loss']:.4g} -> {s['final_val_loss']:.4g}, old "
              f"{s['initial_val_loss_old']:.4g} -> {s['final_val_loss_old']:.4g} "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def _options() -> list[str]:
    chosen = _OPTIONS.value or [o for o in OPTIONS if o != "l2sp" or _STUDY.value]
    unknown = sorted(set(chosen) - set(OPTIONS))
    if unknown:
        raise app.UsageError(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    return [o for o in OPTIONS if o in chosen]


def _ms(values: list[float], fmt: str = "{:+.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {np.std(values, ddof=1):.1f}"


def collect(out: Path, seeds: list[int], starts: list[int]) -> dict:
    """start -> option -> {new, old, retrained}: % changes from the starting network's
    held-out losses (those of the ``tgd`` run's step 0, which is the pretrained network;
    re-initialising runs start from another one) and % retrained."""
    table: dict = {}
    for step in starts:
        for option in _options():
            entry = table.setdefault(step, {}).setdefault(option, {"new": [], "old": [],
                                                                   "retrained": []})
            for seed in seeds:
                base = out / f"start{step}" / f"s{seed}" / "tgd" / "summary.json"
                path = out / f"start{step}" / f"s{seed}" / option / "summary.json"
                if not (base.exists() and path.exists()):
                    continue
                b, s = json.loads(base.read_text()), json.loads(path.read_text())
                entry["new"].append(100 * (s["final_val_loss"] / b["initial_val_loss"] - 1))
                entry["old"].append(100 * (s["final_val_loss_old"] /
                                           b["initial_val_loss_old"] - 1))
                entry["retrained"].append(100 * s["retrained_fraction"])
    return table


def report(out: Path, seeds: list[int], starts: list[int]) -> str:
    table = collect(out, seeds, starts)
    lines = ["# Where TGD can learn: dead and alive low-KSE kernels", "",
             "`python experiments/dead_kernels.py` ("
             + (f"--study={_STUDY.value}: the study's v1-nets at the end of their schedule; "
                if _STUDY.value else "the long pretrainings of experiments/premise_training.py; ")
             + "demo config, projected TGD at phi 0.3, Adam "
             f"1e-4 unless stated, {_STEPS.value} steps). Change of the held-out losses from "
             "the pretrained network's, in %, at the end of fine-tuning (new task: v2 images; old "
             "task: v1 images), mean ± sd over seeds "
             f"{', '.join(map(str, seeds))}.", ""]
    for step in starts:
        title = ("the END of the study's pretraining schedule (its v1-nets' last checkpoint)"
                 if step == END else f"pretraining step {step}")
        lines += [f"## Start: {title}", "",
                  "| option | seeds | retrained % | new task (v2) % | old task (v1) % |",
                  "|---|---|---|---|---|"]
        for option, e in table[step].items():
            lines.append(f"| {option} | {len(e['new'])} | {_ms(e['retrained'], '{:.1f}')} | "
                         f"{_ms(e['new'])} | {_ms(e['old'])} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "dead_kernels.md").write_text(text + "\n")
    (out / "dead_kernels.json").write_text(json.dumps({str(k): v for k, v in table.items()}))
    _figure(table, out / "dead_kernels.png")
    return text


def _figure(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.2), squeeze=False)
    for ax, (step, options) in zip(axes[0], table.items(), strict=True):
        for option, e in options.items():
            if not e["new"]:
                continue
            ax.errorbar(np.mean(e["new"]), np.mean(e["old"]),
                        xerr=np.std(e["new"]) if len(e["new"]) > 1 else 0,
                        yerr=np.std(e["old"]) if len(e["old"]) > 1 else 0, fmt="o", ms=4,
                        capsize=2, label=option)
        ax.axvline(0, color="k", lw=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="new task (v2) held-out loss change %",
               ylabel="old task (v1) held-out loss change %",
               title="start: end of the schedule" if step == END
               else f"start: pretraining step {step}")
        ax.legend(fontsize=7)
    fig.suptitle("Better: left (learns the new task) and low (keeps the old one)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    runs, out = Path(_STUDY.value or _RUNS.value).resolve(), Path(_OUT.value).resolve()
    seeds = [int(s) for s in _SEEDS.value]
    starts = [END] if _STUDY.value else [_CONVERGED.value, _ALIVE.value]
    out.mkdir(parents=True, exist_ok=True)
    for stage in _STAGES.value:
        if stage == "finetune":
            finetune(runs, out, seeds, starts)
        elif stage == "report":
            print(report(out, seeds, starts))
        else:
            raise app.UsageError(f"unknown stage {stage!r}")


if __name__ == "__main__":
    app.run(main)
