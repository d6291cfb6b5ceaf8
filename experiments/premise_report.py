"""``premise.md`` and its figures, from the files of ``experiments/premise.py``'s runs only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: The written criterion for the default pretraining recipe (checked per width).
CRITERION = (
    "A recipe qualifies when (a) its mean held-out v1 loss is no worse than the "
    "unregularised cosine recipe of the same width plus one standard deviation over seeds, "
    "and (b) zeroing the kernels with KSE < 0.3 raises the held-out loss by less than 2 % "
    "(mean over seeds). Among qualifying recipes the default is the one that retrains the "
    "largest fraction at phi 0.3 (the most kernels found useless)."
)
PHIS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _ms(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.replace('+', '').format(np.std(values, ddof=1))}"


def _metrics(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretrain_table(out: Path, recipes: list[str], seeds: list[int]) -> tuple[list[str], dict]:
    stats: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        runs = []
        for seed in seeds:
            workdir = out / "pretrain" / f"{recipe}-s{seed}"
            summary, thr = _json(workdir / "summary.json"), _json(
                workdir / "threshold" / "threshold.json")
            if summary is None or thr is None:
                continue
            rows = {round(r["phi"], 2): r for r in thr["rows"]}
            intact = thr["intact_loss"]
            r3 = rows.get(0.3, {})
            share = r3.get("consumer_share", {})
            maps = {k: v[0] / v[1] for k, v in r3.get("channels", {}).items() if k in share}
            runs.append({
                "share": float(np.mean(list(share.values()))) if share else float("nan"),
                "maps": float(np.mean(list(maps.values()))) if maps else float("nan"),
                "loss": summary["best_val_loss"], "intact": intact,
                "fraction": {p: rows[p]["fraction"] for p in PHIS if p in rows},
                "cost": {p: {m: rows[p][m]["loss"] / intact - 1 for m in ("kse", "random", "l1")}
                         for p in PHIS if p in rows}})
        if runs:
            stats[recipe] = {"runs": runs, "seeds": len(runs)}
    lines = ["| recipe | seeds | held-out v1 MSE | retrained at phi .1 / .2 / .3 / .4 / .5 / .6 "
             "(%) | loss change, phi-0.3 kernels zeroed: KSE | random (same counts) | L1 | "
             "phi 0.3: share of maps / of consumer weight |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, st in stats.items():
        runs = st["runs"]
        fr = " / ".join(f"{100 * np.mean([r['fraction'][p] for r in runs]):.1f}" for p in PHIS)
        cost = {m: [100 * r["cost"][0.3][m] for r in runs] for m in ("kse", "random", "l1")}
        lines.append(f"| {recipe} | {st['seeds']} | {_ms([r['loss'] for r in runs], '{:.3g}')} "
                     f"| {fr} | {_ms(cost['kse'], '{:+.1f}')} % | "
                     f"{_ms(cost['random'], '{:+.0f}')} % | {_ms(cost['l1'], '{:+.0f}')} % | "
                     f"{100 * np.mean([r['maps'] for r in runs]):.1f} / "
                     f"{100 * np.mean([r['share'] for r in runs]):.1f} % |")
    return lines, stats


def choose(stats: dict[str, Any]) -> tuple[str | None, list[str]]:
    """Applies :data:`CRITERION`; returns the chosen recipe and one line per recipe."""
    verdicts, passing = [], []
    for recipe, st in stats.items():
        width = "-w375" if recipe.endswith("-w375") else ""
        base = stats.get(f"none-cos{width}")
        runs = st["runs"]
        loss = np.mean([r["loss"] for r in runs])
        cost = np.mean([r["cost"][0.3]["kse"] for r in runs])
        if base is None:
            verdicts.append(f"- {recipe}: no unregularised reference of its width")
            continue
        base_losses = [r["loss"] for r in base["runs"]]
        bound = np.mean(base_losses) + (np.std(base_losses, ddof=1) if len(base_losses) > 1
                                        else 0.0)
        ok_a, ok_b = loss <= bound, cost < 0.02
        verdicts.append(f"- {recipe}: held-out {loss:.4g} vs bound {bound:.4g} "
                        f"({'ok' if ok_a else 'worse'}); phi-0.3 zeroing {100 * cost:+.1f} % "
                        f"({'ok' if ok_b else 'too costly'})")
        if ok_a and ok_b and not width:
            passing.append((np.mean([r["fraction"][0.3] for r in runs]), -loss, recipe))
    return (max(passing)[2] if passing else None), verdicts


def finetune_table(out: Path, grid: list[tuple[str, str]], lrs: tuple[float, ...],
                   seeds: list[int]) -> tuple[list[str], dict]:
    lines = ["| pretraining | method | lr | retrained | new task (v2 held-out MSE): start -> "
             "end | change | old task (v1 held-out MSE): start -> end | change | gate cosine |",
             "|---|---|---|---|---|---|---|---|---|"]
    curves: dict[tuple[str, str, float], list[list[dict]]] = {}
    for recipe, method in grid:
        for lr in lrs:
            rows = []
            for seed in seeds:
                wd = out / "finetune" / f"{recipe}-s{seed}" / f"{method}-lr{lr:g}"
                s = _json(wd / "summary.json")
                if s is None:
                    continue
                metrics = _metrics(wd)
                cos = [m["gate_cosine"] for m in metrics if "gate_cosine" in m]
                rows.append((s, np.mean(cos) if cos else None))
                curves.setdefault((recipe, method, lr), []).append(metrics)
            if not rows:
                continue
            new0 = [s["initial_val_loss"] for s, _ in rows]
            new1 = [s["final_val_loss"] for s, _ in rows]
            old0 = [s["initial_val_loss_old"] for s, _ in rows]
            old1 = [s["final_val_loss_old"] for s, _ in rows]
            dnew = [100 * (b / a - 1) for a, b in zip(new0, new1, strict=True)]
            dold = [100 * (b / a - 1) for a, b in zip(old0, old1, strict=True)]
            cos = [c for _, c in rows if c is not None]
            frac = np.mean([s["retrained_fraction"] for s, _ in rows])
            lines.append(
                f"| {recipe} | {method} | {lr:g} | {100 * frac:.1f} % | {_ms(new0, '{:.4f}')} -> "
                f"{_ms(new1, '{:.4f}')} | {_ms(dnew, '{:+.0f}')} % | {_ms(old0, '{:.4f}')} -> "
                f"{_ms(old1, '{:.4f}')} | {_ms(dold, '{:+.0f}')} % | "
                f"{_ms(cos, '{:.2f}') if cos else '-'} |")
    return lines, curves


def figures(out: Path, stats: dict, curves: dict, recipes: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgd_jax import threshold as threshold_lib
    from tgd_jax.io import workdir as workdir_lib

    made = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for recipe in recipes:
        if recipe not in stats:
            continue
        runs = stats[recipe]["runs"]
        fr = [100 * np.mean([r["fraction"][p] for r in runs]) for p in PHIS]
        cost = [100 * np.mean([r["cost"][p]["kse"] for r in runs]) for p in PHIS]
        (line,) = a.plot(PHIS, fr, "o-", label=recipe)
        b.plot(PHIS, cost, "o-", color=line.get_color(), label=f"{recipe}: KSE")
        rnd = [100 * np.mean([r["cost"][p]["random"] for r in runs]) for p in PHIS]
        b.plot(PHIS, rnd, "^:", color=line.get_color(), alpha=0.6)
    paper = threshold_lib.PAPER_FRACTIONS
    a.plot(list(paper), [100 * v for v in paper.values()], "s--", color="k", label="paper")
    a.set(xlabel="phi", ylabel="parameters retrained / dropped (%)", ylim=(0, 100))
    a.legend(fontsize=6)
    b.set(xlabel="phi", ylabel="held-out loss change when zeroed (%)", yscale="symlog")
    b.axhline(2, color="k", lw=0.6, ls="--")
    b.set_title("solid: KSE choice; dotted: same counts at random", fontsize=8)
    fig.suptitle("Threshold study over pretraining recipes (mean over seeds)", fontsize=9)
    fig.tight_layout()
    workdir_lib.save_figure(fig, out / "threshold_recipes.png")
    made.append("threshold_recipes.png")

    for recipe in {r for r, _, _ in curves}:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for (rec, method, lr), runs in sorted(curves.items()):
            if rec != recipe or lr != 1e-3:
                continue
            val = [[m for m in run if "val_loss" in m and "val_loss_old" in m] for run in runs]
            steps = [m["step"] for m in val[0]]
            new = np.mean([[m["val_loss"] for m in v] for v in val], axis=0)
            old = np.mean([[m["val_loss_old"] for m in v] for v in val], axis=0)
            axes[0].plot(steps, new, label=method)
            axes[1].plot(steps, old, label=method)
            cos = [[m for m in run if "gate_cosine" in m] for run in runs]
            if cos[0]:
                axes[2].plot([m["step"] for m in cos[0]],
                             np.mean([[m["gate_cosine"] for m in c] for c in cos], axis=0),
                             label=method)
        axes[0].set(xlabel="step", ylabel="new task: v2 held-out MSE")
        axes[1].set(xlabel="step", ylabel="old task: v1 held-out MSE")
        axes[2].set(xlabel="step", ylabel="cos(gated, true gradient)", ylim=(-0.05, 1.05))
        for ax in axes:
            ax.legend(fontsize=6)
        fig.suptitle(f"Fine-tuning from {recipe} (Adam 1e-3, mean over seeds)", fontsize=9)
        fig.tight_layout()
        name = f"finetune_{recipe}.png"
        workdir_lib.save_figure(fig, out / name)
        made.append(name)
    return made


def write(out: Path, seeds: list[int], *, recipes: list[str], grid: list[tuple[str, str]],
          lrs: tuple[float, ...], pretrain_steps: int, finetune_steps: int) -> Path:
    """Writes ``premise.md``, ``premise.json`` and the figures into ``out``."""
    lines_p, stats = pretrain_table(out, recipes, seeds)
    chosen, verdicts = choose(stats)
    lines_f, curves = finetune_table(out, grid, lrs, seeds)
    made = figures(out, stats, curves, recipes)
    text = [
        "# The premise: useless kernels, the pretraining recipe, and TGD's fine-tuning",
        "",
        f"Runs: `python experiments/premise.py --out={out}` (seeds {seeds}); every number "
        "below is read from those runs' files. Demo datasets; DnCNN at width 0.25 "
        f"(w375: 0.375), batch 16, {pretrain_steps} pretraining steps (4k: 4,000); "
        f"{finetune_steps} fine-tuning steps. Mean ± sd over seeds.",
        "",
        "## Pretraining recipes and the threshold study",
        "",
        "Held-out v1 MSE: the v1 study the network never trained on (256 fixed patches). Loss "
        "change: the held-out loss with the kernels zeroed, relative to the intact network. "
        "Last column: the maps TGD retrains at phi 0.3, as a share of each layer's maps and "
        "as a share of the L1 mass of the consumer's kernel that reads them (mean over "
        "layers). Useless maps would carry ~0 % of the consumer's weight; a random choice "
        "carries about its share of maps.",
        "",
        *lines_p,
        "",
        "## The criterion",
        "",
        CRITERION,
        "",
        *verdicts,
        "",
        f"**Chosen: {chosen}**" if chosen else "**No recipe meets the criterion.**",
        "",
        "## Fine-tuning (v1-net -> v2, 2 low-BMI studies)",
        "",
        "New task: v2 images of the held-out study; old task: v1 images of the same study. "
        "Change: end relative to start, per seed, then mean ± sd. Gate cosine: cosine between "
        "the gradient the paper-mode gates let through and the true gradient, over the "
        "retrained elements, mean over all steps (1 by construction in projected mode).",
        "",
        *lines_f,
        "",
        "## Figures",
        "",
        *[f"![{m}]({m})" for m in made],
        "",
    ]
    path = out / "premise.md"
    path.write_text("\n".join(text))
    (out / "premise.json").write_text(json.dumps({"chosen": chosen, "verdicts": verdicts},
                                                 indent=1))
    return path
