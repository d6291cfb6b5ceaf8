r"""The premise along training: does KSE find idle kernels once pretraining has converged?

  python experiments/premise_training.py --runs=runs/long --data=runs/long/data/train.h5

``--runs`` holds one pretraining per seed (``seed<s>/``), each with checkpoints kept at
log-spaced steps (``kept/<step>``), as made by::

  python train.py --config=configs/train.py:demo --config.num_steps=32000 --cpu_devices=1 \
      --config.keep_steps='(250,500,1000,2000,3000,4000,6000,8000,12000,16000,24000,32000)' \
      --config.data.path=runs/long/data/train.h5 --config.seed=<s> --workdir=runs/long/seed<s>

(the study preset's training set: ``python -m tgd_jax.sim --role=train --studies=13
--slices=16``). This runs the threshold study (``threshold.py``'s) on every kept checkpoint
not yet studied, then writes ``premise_training.{md,json,png}``: per step, mean ± sd over
seeds of the held-out loss, the fraction retrained at phi 0.3 and 0.5, the cost of zeroing
those kernels for KSE, random and L1 choices, and the share of the next layer's weight that
reads them (0 when the premise holds exactly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

_RUNS = flags.DEFINE_string("runs", "runs/long", "Folder with seed<s>/kept/<step>/.")
_DATA = flags.DEFINE_string("data", "runs/long/data/train.h5", "Training set (its last study "
                            "is the held-out one).")
_STAGES = flags.DEFINE_list("stages", ["threshold", "report"], "Stages to run.")

PHIS = (0.3, 0.5)
#: The premise holds at phi when zeroing the kernels below it changes the held-out loss by
#: less than this (the premise sweep's criterion) ...
FREE = 0.02
#: ... and random choices of the same size cost at least this much (KSE finds them).
RANDOM_COSTS = 0.10


def _kept(runs: Path) -> dict[int, dict[int, Path]]:
    out: dict[int, dict[int, Path]] = {}
    for seed_dir in sorted(runs.glob("seed*")):
        if not seed_dir.name[4:].isdigit():
            continue
        for step_dir in sorted((seed_dir / "kept").glob("*")):
            if step_dir.name.isdigit() and (step_dir / "state").is_dir():
                out.setdefault(int(seed_dir.name[4:]), {})[int(step_dir.name)] = step_dir
    return out


def thresholds(runs: Path, data: str) -> None:
    from tgd_jax.pet import premise

    for seed, steps in _kept(runs).items():
        for step, folder in steps.items():
            out = runs / "threshold" / f"seed{seed}-{step}"
            if (out / "threshold.json").exists():
                continue
            premise.threshold_checkpoint(str(folder), data, out, version="v1", studies=1,
                                         examples=256, seed=0, log=lambda m: None)
            print(f"[threshold] seed {seed} step {step} done", flush=True)


def _val_losses(runs: Path, seed: int) -> dict[int, float]:
    path = runs / f"seed{seed}" / "metrics.jsonl"
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            out[int(record["step"])] = float(record["val_loss"])
    return out


def collect(runs: Path) -> dict[int, dict[str, list[float]]]:
    """step -> measure -> values over seeds."""
    table: dict[int, dict[str, list[float]]] = {}
    for seed, steps in _kept(runs).items():
        losses = _val_losses(runs, seed)
        for step in steps:
            path = runs / "threshold" / f"seed{seed}-{step}" / "threshold.json"
            if not path.exists():
                continue
            study = json.loads(path.read_text())
            rows = {round(r["phi"], 2): r for r in study["rows"]}
            entry = table.setdefault(step, {})
            entry.setdefault("held_out", []).append(losses.get(step, float("nan")))
            intact = study["intact_loss"]
            for phi in PHIS:
                row = rows[phi]
                entry.setdefault(f"retrained_{phi}", []).append(100 * row["fraction"])
                for choice in ("kse", "random", "l1"):
                    entry.setdefault(f"{choice}_{phi}", []).append(
                        100 * (row[choice]["loss"] / intact - 1))
                share = row.get("consumer_share", {})
                entry.setdefault(f"share_{phi}", []).append(
                    100 * float(np.mean(list(share.values()))) if share else float("nan"))
    return dict(sorted(table.items()))


def _ms(values: list[float], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"


def verdict(table: dict[int, dict[str, list[float]]]) -> str:
    """The first step from which, for every seed and at phi 0.3, zeroing the kernels KSE
    marks costs less than :data:`FREE` and the same counts at random at least
    :data:`RANDOM_COSTS` (the premise), if any."""
    holds = []
    for step, entry in table.items():
        ok = all(k < 100 * FREE and r >= 100 * RANDOM_COSTS and f > 0
                 for k, r, f in zip(entry["kse_0.3"], entry["random_0.3"],
                                    entry["retrained_0.3"], strict=True))
        holds.append((step, ok, len(entry["kse_0.3"])))
    first = next((step for i, (step, ok, _) in enumerate(holds)
                  if ok and all(o for _, o, _ in holds[i:])), None)
    seeds = max((n for _, _, n in holds), default=0)
    if first is None:
        return (f"The premise does not appear along training (to step {max(table)}, "
                f"{seeds} seeds): at no step from which on every later one qualifies does "
                f"zeroing the kernels below phi 0.3 cost less than {100 * FREE:.0f} % while "
                f"random choices of the same size cost {100 * RANDOM_COSTS:.0f} % or more.")
    entry = table[first]
    return (f"The premise appears as training converges: from step {first} on (of "
            f"{max(table)}; {seeds} seeds) zeroing the kernels below phi 0.3 "
            f"({_ms(entry['retrained_0.3'])} % of the parameters) costs "
            f"{_ms(entry['kse_0.3'])} % of held-out loss, against "
            f"{_ms(entry['random_0.3'])} % for the same counts at random.")


def report(runs: Path) -> str:
    table = collect(runs)
    seeds = sorted(_kept(runs))
    lines = ["# The premise along training", "",
             f"`python experiments/premise_training.py` on `{runs}` (seeds "
             f"{', '.join(map(str, seeds))}; the default pretraining recipe at quarter width, "
             "a cosine schedule planned over 32,000 steps; the threshold study of each kept "
             "checkpoint on the held-out study's v1 images). Mean ± sd over the seeds that "
             "reached a step; the last kept checkpoint of each seed: "
             + ", ".join(f"seed {s}: {max(steps)}" for s, steps in sorted(_kept(runs).items()))
             + ".",
             "", verdict(table), "",
             "| step | held-out MSE | retrained % (0.3 / 0.5) | zeroing cost %, KSE (0.3) | "
             "random (0.3) | L1 (0.3) | KSE (0.5) | random (0.5) | next layer's weight on "
             "them % (0.3) |", "|---|---|---|---|---|---|---|---|---|"]
    for step, e in table.items():
        lines.append(f"| {step} | {_ms(e['held_out'], '{:.5f}')} | "
                     f"{_ms(e['retrained_0.3'])} / {_ms(e['retrained_0.5'])} | "
                     f"{_ms(e['kse_0.3'])} | {_ms(e['random_0.3'])} | {_ms(e['l1_0.3'])} | "
                     f"{_ms(e['kse_0.5'])} | {_ms(e['random_0.5'])} | {_ms(e['share_0.3'])} |")
    text = "\n".join(lines) + "\n"
    (runs / "premise_training.md").write_text(text)
    (runs / "premise_training.json").write_text(json.dumps({str(k): v for k, v in
                                                            table.items()}))
    _figure(table, runs / "premise_training.png")
    return text


def _figure(table: dict[int, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(table)

    def band(ax, key, label, style="o-", transform=lambda v: v):
        values = [[transform(v) for v in table[s][key] if np.isfinite(v)] for s in steps]
        mean = np.array([np.mean(v) if v else np.nan for v in values])
        sd = np.array([np.std(v) if len(v) > 1 else 0.0 for v in values])
        line, = ax.plot(steps, mean, style, ms=3, label=label)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    band(axes[0], "held_out", "held-out MSE")
    axes[0].set(yscale="log", title="held-out loss")
    for phi in PHIS:
        band(axes[1], f"retrained_{phi}", f"phi {phi}")
    axes[1].set(ylabel="% of parameters", title="marked useless (KSE < phi)")
    ratio = lambda v: 1 + v / 100  # noqa: E731
    for choice, style in (("kse", "o-"), ("random", "x--"), ("l1", "s:")):
        band(axes[2], f"{choice}_0.3", choice, style, ratio)
    axes[2].set(yscale="log", ylabel="loss zeroed / intact", title="cost of zeroing, phi 0.3")
    axes[2].axhline(1 + FREE, color="k", lw=0.6)
    for phi in PHIS:
        band(axes[3], f"share_{phi}", f"phi {phi}")
    axes[3].set(ylabel="%", title="next layer's weight on them")
    for ax in axes:
        ax.set(xscale="log", xlabel="pretraining step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    runs = Path(_RUNS.value)
    for stage in _STAGES.value:
        if stage == "threshold":
            thresholds(runs, _DATA.value)
        elif stage == "report":
            print(report(runs))
        else:
            raise app.UsageError(f"unknown stage {stage!r}")


if __name__ == "__main__":
    app.run(main)
