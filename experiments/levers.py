r"""Why our denoisers blur: one training lever at a time against today's recipe, 3 seeds.

  python experiments/levers.py --out=runs/levers                # train, evaluate, report
  python experiments/levers.py --out=runs/levers --stages=report

Every lever is a v2-net (``train.py``, demo config: quarter-width DnCNN, 16 patches a step)
trained on the ``study`` preset's training set (13 oncology studies of 16 slices, the last
held out) and changed in ONE field from the ``study`` preset's recipe (``base``: 3,000 steps,
cosine schedule, coupled L2 1e-2, MSE, Adam 1e-3). Each network is then evaluated on the
graded-lesion test set (``python -m tgd_jax.sim --role=test --lesions=graded``) against the
Gaussian post-filter of the same input at matched liver CoV (:mod:`tgd_jax.pet.baseline`).

The report gives per lever: held-out loss at the end, its fall over the last quarter of the
schedule (the plateau criterion, :func:`tgd_jax.train.metrics.plateau`), the gain over the
Gaussian per lesion size (mean ± sd over seeds and test studies), and CPU time. Runs are
resumable: a finished network is skipped, a killed one resumes from its checkpoint.
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

_OUT = flags.DEFINE_string("out", "runs/levers", "Output folder (data/ holds the datasets).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_LEVERS = flags.DEFINE_list("levers", None, "Levers to run (default: all of LEVERS).")
_STAGES = flags.DEFINE_list("stages", ["data", "train", "eval", "report"], "Stages to run.")
_PREVIOUS = flags.DEFINE_string(
    "previous", None, "A levers.json of an earlier sweep on the same data (e.g. "
    "docs/denoiser/levers.json): its seeds that --out does not hold are kept in the report, "
    "so a sweep can be continued on a new machine. Its networks' test rows must have been "
    "measured on the same test set (checked on the input's rows).")
_REPO = flags.DEFINE_string("repo", str(Path(__file__).resolve().parent.parent),
                            "Checkout whose commands run (e.g. a git worktree of one commit, "
                            "so that editing this one leaves hours of runs alone); a relative "
                            "--out must name the same folder from there.")

#: The study preset's pretraining (reproduce.py --preset=study), the lever table's reference.
BASE: dict[str, object] = {"num_steps": 3000, "eval_every": 500}

#: lever -> the config fields it changes from :data:`BASE` (one idea per lever).
LEVERS: dict[str, dict[str, object]] = {
    "base": {},
    "mae": {"loss": "mae"},  # L1 loss: less pull toward the conditional mean
    "long": {"num_steps": 12000},  # 4x the steps, the cosine schedule run to its end
    # base's schedule, then 1,000 steps held at 1 % of the peak rate: does the network
    # still improve once its schedule has ended? (the plateau, without the annealing drop)
    "hold": {"num_steps": 4000, "optimizer.decay_fraction": 0.75,
             "optimizer.final_lr_fraction": 0.01},
    "half": {"model.width_multiplier": 0.5},  # twice the width (4x the parameters)
    "lr3e-4": {"optimizer.learning_rate": 3e-4},
    "patch64": {"data.patch_size": 64, "batch_size": 4},  # same pixels per step, wider context
    "hot": {"data.hot_fraction": 0.5},  # half the patches hold a hot voxel (top 1 %)
    "noiseless": {"data.target": "noiseless"},  # the noise-free reconstruction as the target:
    # the ceiling of better targets (no scanner gives it)
    "warmup": {"optimizer.warmup_steps": 300},  # a tenth of the run rising from 0
    # the images x 1/4: coupled L2 and Adam's epsilon see another scale of the data; the
    # 99th percentile of the training targets falls from about 4 SUV to about 1
    "scale0.25": {"data.intensity_scale": 0.25},
    "v1": {"data.version": "v1"},  # not a lever: today's recipe as v1-net, on v1 test images
}

#: Datasets: role -> simulator flags (the study preset's training set; graded test lesions).
DATA: dict[str, tuple[str, ...]] = {
    "train": ("--role=train", "--studies=13", "--slices=16", "--noiseless"),
    "test": ("--role=test", "--studies=2", "--slices=16", "--realisations=10",
             "--high_bmi_fraction=0.5", "--lesions=graded"),
}


def _run(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TGD_CPU_DEVICES": os.environ.get("TGD_CPU_DEVICES", "1"),
           "PYTHONPATH": _REPO.value}  # the checkout's package, not the installed one
    with open(log, "a") as f:
        subprocess.run([sys.executable, *argv], cwd=_REPO.value, stdout=f,
                       stderr=subprocess.STDOUT, check=True, env=env)


def _levers() -> list[str]:
    chosen = _LEVERS.value or list(LEVERS)
    unknown = sorted(set(chosen) - set(LEVERS))
    if unknown:
        raise app.UsageError(f"unknown levers {unknown}; choose from {list(LEVERS)}")
    return [name for name in LEVERS if name in chosen]


def data(out: Path) -> None:
    for role, extra in DATA.items():
        if (out / "data" / f"{role}.h5").exists():
            continue
        _run(["-m", "tgd_jax.sim", "--preset=demo", f"--out={out / 'data'}", *extra],
             out / "logs" / f"sim-{role}.log")


def train(out: Path, seeds: list[int]) -> None:
    # Lever by lever, every seed of one before the next: a cut-short sweep has whole levers.
    todo = [(lever, seed) for lever in _levers() for seed in seeds]
    t0 = time.perf_counter()
    for i, (lever, seed) in enumerate(todo):
        workdir = out / lever / f"s{seed}"
        if (workdir / "summary.json").exists():
            continue
        fields = {**BASE, **LEVERS[lever]}
        fields = {"data.version": "v2", **fields}
        argv = ["train.py", f"--workdir={workdir}", "--config=configs/train.py:demo",
                f"--config.data.path={out / 'data' / 'train.h5'}", f"--config.seed={seed}",
                *(f"--config.{k}={v}" for k, v in fields.items())]
        start = time.perf_counter()
        _run(argv, out / "logs" / f"{lever}-s{seed}.log")
        (workdir / "cpu_seconds.json").write_text(json.dumps(
            {"wall_s": time.perf_counter() - start}))
        print(f"[{i + 1}/{len(todo)}] {lever} s{seed} done "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def evaluate(out: Path, seeds: list[int]) -> None:
    """One ``evaluate.py`` per lever, every finished seed at once, on the graded test set."""
    for lever in _levers():
        nets = [f"--net=s{s}={out / lever / f's{s}'}" for s in seeds
                if (out / lever / f"s{s}" / "summary.json").exists()]
        target = out / "eval" / lever
        done = target / "evaluation.json"
        if not nets or (done.exists() and len(json.loads(done.read_text())["rows"])
                        == 2 * (len(nets) + 1)):
            continue
        version = {**BASE, **LEVERS[lever]}.get("data.version", "v2")
        _run(["evaluate.py", f"--test={out / 'data' / 'test.h5'}", f"--out={target}",
              "--overwrite", f"--version={version}", *nets], out / "logs" / f"eval-{lever}.log")
        print(f"evaluated {lever} ({len(nets)} seeds)", flush=True)


def _ms(values: list[float], digits: int = 1, sign: str = "+") -> str:
    """Mean ± sample sd (``sign="+"``: signed, as for gains; ``""``: plain)."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{np.mean(values):{sign}.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _seeds_of(entry: dict) -> list[int]:
    """The seeds of a levers.json entry, in the order of its per-seed lists."""
    if "seeds" in entry:
        return [int(s) for s in entry["seeds"]]
    # (entries written before "seeds" existed: one network "s<seed>" per seed, in order)
    return sorted({int(r["network"][1:]) for r in entry["rows"]})


def _merge(entry: dict, earlier: dict, lever: str) -> dict:
    """``entry`` with the seeds of ``earlier`` (a previous sweep's entry) it lacks."""
    mine, theirs = entry["seeds"], _seeds_of(earlier)
    if entry.get("input") and earlier.get("input"):
        key = lambda r: (r["study"], round(r["liver_cov_pct"], 6))  # noqa: E731
        if sorted(map(key, entry["input"])) != sorted(map(key, earlier["input"])):
            raise app.UsageError(f"--previous: lever {lever!r} was evaluated on another test "
                                 "set (its input rows differ from this sweep's)")
    merged = {k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}
    for i, seed in enumerate(theirs):
        if seed in mine or i >= len(earlier["loss"]):
            continue
        for key in ("loss", "fall", "plateau", "wall_min"):
            if i < len(earlier.get(key, [])):
                merged[key].append(earlier[key][i])
        merged["seeds"].append(seed)
        merged["rows"] += [r for r in earlier["rows"] if r["network"] == f"s{seed}"]
    merged["gaussian"] = entry["gaussian"] or earlier.get("gaussian", {})
    merged["input"] = entry.get("input") or earlier.get("input", [])
    return merged


def collect(out: Path, seeds: list[int], previous: dict | None = None) -> dict:
    """lever -> {seeds, loss, fall, plateau, wall_min (one per seed), rows (evaluation
    rows of its networks), gaussian (study -> curve), input (the input's rows)}; seeds
    that ``out`` lacks are taken from ``previous`` (an earlier levers.json)."""
    from tgd_jax.train.metrics import plateau, read_metrics

    table: dict = {}
    for lever in _levers():
        entry = {"seeds": [], "loss": [], "fall": [], "plateau": [], "wall_min": [],
                 "rows": [], "gaussian": {}}
        for seed in seeds:
            workdir = out / lever / f"s{seed}"
            if not (workdir / "summary.json").exists():
                continue
            entry["seeds"].append(seed)
            records = read_metrics(workdir / "metrics.jsonl")
            steps = int({**BASE, **LEVERS[lever]}["num_steps"])
            p = plateau(records, steps)
            # in SUV^2 whatever the lever's intensity scale (the loss is of scaled images)
            scale = float({**BASE, **LEVERS[lever]}.get("data.intensity_scale", 1.0))
            entry["loss"].append([r["val_loss"] for r in records if "val_loss" in r][-1]
                                 / scale ** 2)
            entry["fall"].append(100 * p["fall"])
            entry["plateau"].append(p["plateau"])
            wall = workdir / "cpu_seconds.json"
            if wall.exists():
                entry["wall_min"].append(json.loads(wall.read_text())["wall_s"] / 60)
        done = out / "eval" / lever / "evaluation.json"
        if done.exists():
            result = json.loads(done.read_text())
            entry["rows"] = [r for r in result["rows"] if r["network"] != "input"]
            entry["gaussian"] = result["gaussian"]
            entry["input"] = [r for r in result["rows"] if r["network"] == "input"]
        if previous and lever in previous:
            entry = _merge(entry, previous[lever], lever)
        if entry["seeds"]:
            table[lever] = entry
    return table


def _gains(entry: dict, study: str, lesion: str) -> list[float]:
    return [r["lesions"][lesion]["gain_bias_pct"] for r in entry["rows"]
            if r["study"] == study and lesion in r["lesions"]]


def report(out: Path, seeds: list[int]) -> str:
    from tgd_jax.sim.phantom import HEADLINE_LESION

    previous = json.loads(Path(_PREVIOUS.value).read_text()) if _PREVIOUS.value else None
    table = collect(out, seeds, previous)
    studies, lesions = [], []
    for entry in table.values():
        for r in entry["rows"]:
            if r["study"] not in studies:
                studies.append(r["study"])
            for name in r["lesions"]:
                if name not in lesions:
                    lesions.append(name)
    lesions.sort(key=lambda n: (n != "lesion_0", "soft" in n, float(n.split("_")[-1][:-2])
                                if n.endswith("mm") else 0.0))
    bmi = {r["study"]: r["bmi_class"] for e in table.values() for r in e["rows"]}
    lines = ["# Why our denoisers blur: one lever at a time", "",
             "`python experiments/levers.py` (v2-nets, demo config, the `study` preset's "
             "training set; one field changed per lever from `base`, the study preset's "
             f"recipe {BASE}; the `v1` row: the same recipe as v1-nets, held-out loss and "
             "test images of v1). Mean ± sd over seeds "
             f"{', '.join(map(str, seeds))}. Wall minutes of a run's last invocation, with "
             "two runs and other work sharing 2 cores: relative only. Gain: the "
             "network's lesion bias minus a Gaussian post-filter's of the same input at the "
             "same liver CoV, in points (> 0: keeps more lesion than a blur of the same "
             "noise); \"-\": off the Gaussian's range. Test set: 2 studies of 16 slices "
             "with the graded lesions, 10 realisations of 60 s.", "",
             "| lever | changes | seeds | held-out loss | last-quarter fall % | plateau | "
             "minutes | " + " | ".join(f"liver CoV % ({bmi.get(s, '?')} BMI)" for s in studies)
             + " | " + " | ".join(f"{HEADLINE_LESION[7:]} gain ({bmi.get(s, '?')} BMI)"
                                  for s in studies) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * (2 * len(studies))]
    for lever, e in table.items():
        covs = [_ms([r["liver_cov_pct"] for r in e["rows"] if r["study"] == s], 2, "")
                for s in studies]
        heads = [_ms(_gains(e, s, HEADLINE_LESION)) for s in studies]
        lines.append(f"| {lever} | {LEVERS[lever] or '-'} | {len(e['loss'])} | "
                     f"{_ms(e['loss'], 5, '')} | {_ms(e['fall'], 1, '')} | "
                     f"{sum(e['plateau'])}/{len(e['plateau'])} | "
                     f"{_ms(e['wall_min'], 0, '')} | " + " | ".join(covs) + " | "
                     + " | ".join(heads) + " |")
    for study in studies:
        lines += ["", f"## Gain per lesion, {study} ({bmi.get(study, '?')} BMI)", "",
                  "| lever | " + " | ".join(n[7:] for n in lesions) + " |",
                  "|---|" + "---|" * len(lesions)]
        for lever, e in table.items():
            lines.append(f"| {lever} | " + " | ".join(_ms(_gains(e, study, n))
                                                      for n in lesions) + " |")
    text = "\n".join(lines) + "\n"
    (out / "levers.md").write_text(text)
    (out / "levers.json").write_text(json.dumps(table, default=float))
    _figure(table, studies, bmi, out / "levers.png")
    return text


def _figure(table: dict, studies: list[str], bmi: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgd_jax.sim.phantom import GRADED_LESIONS, HEADLINE_LESION

    fig, axes = plt.subplots(2, len(studies), figsize=(6 * len(studies), 8.5), squeeze=False)
    for j, study in enumerate(studies):
        ax, bx = axes[0, j], axes[1, j]
        for k, (lever, e) in enumerate(table.items()):
            sizes = GRADED_LESIONS["liver"]
            gains = [_gains(e, study, f"lesion_liver_{d:g}mm") for d in sizes]
            ok = [i for i, g in enumerate(gains) if g]
            if ok:
                ax.errorbar([sizes[i] + 0.25 * (k - 1) for i in ok],
                            [np.mean(gains[i]) for i in ok],
                            yerr=[np.std(gains[i], ddof=1) if len(gains[i]) > 1 else 0
                                  for i in ok], fmt="-o", ms=4, capsize=2, label=lever)
            rows = [r for r in e["rows"] if r["study"] == study]
            if rows and {**BASE, **LEVERS[lever]}.get("data.version", "v2") == "v2":
                # (another version's networks sit on their own images' curve, not this one)
                bx.plot([r["liver_cov_pct"] for r in rows],
                        [r["headline_bias_pct"] for r in rows], "o", ms=5, label=lever)
            if e["gaussian"].get(study) and k == 0:
                g = e["gaussian"][study]
                bx.plot(g["liver_cov_pct"], g[f"{HEADLINE_LESION}/bias_pct"], "k.-", lw=0.8,
                        label="Gaussian post-filter")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="liver lesion diameter (mm)", ylabel="bias gain over the Gaussian "
               "(points)", title=f"{study} ({bmi.get(study, '?')} BMI): above 0 beats a blur")
        bx.set(xlabel="liver CoV %", ylabel=f"{HEADLINE_LESION} bias %",
               title="every seed on v2 images, with the Gaussian curve of the input")
        ax.legend(fontsize=7)
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = Path(_OUT.value)  # relative paths: relative to --repo too (link its runs/ there)
    seeds = [int(s) for s in _SEEDS.value]
    if "data" in _STAGES.value:
        data(out)
    if "train" in _STAGES.value:
        train(out, seeds)
    if "eval" in _STAGES.value:
        evaluate(out, seeds)
    if "report" in _STAGES.value:
        print(report(out, seeds))


if __name__ == "__main__":
    app.run(main)
