"""``report.md`` of a reproduction, written from its measured files only.

:func:`collect` reads what the jobs of :mod:`tgd_jax.pet.reproduce` wrote (evaluations,
summaries, the threshold study, job records); :func:`write` turns it into tables, figures
and one sentence per claim of the paper. Every verdict follows a rule fixed here, in code,
before the numbers are seen (:data:`RULES`): a difference between two systems counts only
when it exceeds twice the larger of their seed standard deviations; with one seed nothing
is a finding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgd_jax.errors import TGDError, UsageError
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import reproduce as rp

__all__ = ["collect", "write", "Stat", "stat", "compare", "PAPER_TABLE1", "RULES"]

#: The paper's Table 1 (low-BMI test study).
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "v1-net": (-6.30, 6.02), "v2-net": (-4.07, 8.56), "FT-net": (-4.71, 7.87),
    "TGD-net": (-3.77, 6.46)}

#: The verdict rules of a report, fixed before the runs (printed in every report).
RULES = """\
* Two systems differ only when their means differ by more than twice the larger of their
  seed standard deviations ("spread"); otherwise the difference is no finding. With one
  seed there is no spread, and no difference is a finding.
* "On par" (claim 1): for lesion bias (by magnitude) and liver CoV each, TGD-net is within
  the spread of v2-net or better. The cost claim (2) is supported when TGD-net's data
  preparation + training time is lower AND claim 1 is supported.
* Table 1's order (claim 3): TGD-net's |lesion bias| is below FT-net's and v1-net's, beyond
  the spread.
* High-BMI retention (claim 4): on the high-BMI study TGD-net's |lesion bias| and liver CoV
  are each within the spread of v1-net's or better.
* Forgetting is the change of the held-out v1 loss from the start of fine-tuning to its end;
  "no forgetting" means that change is within twice its seed sd of zero (or below zero).
* Online learning "removes" a hallucination when the RMSE around the feature drops by more
  than 10 % from the starting network's; "keeps liver noise similar" when the test-study
  liver CoV moves by less than 10 % of its value (one seed: a large-effect rule).
* The threshold study's premise holds at phi when zeroing the kernels below phi changes the
  held-out loss by less than 2 % (the premise sweep's criterion); judged at phi 0.5.
* "Why TGD" (last claim): online TGD moves the low-BMI test PSNR less than N2N of all
  weights does (one seed).
"""


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample sd (nan for one value) and count of some seeds' values."""

    mean: float
    sd: float
    n: int

    def __str__(self) -> str:
        return fmt(self)


def stat(values: Iterable[float]) -> Stat:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))


def fmt(s: Stat, digits: int = 2) -> str:
    if s.n == 0:
        return "-"
    text = f"{s.mean:.{digits}f}"
    return text + (f" ± {s.sd:.{digits}f}" if s.n > 1 else "")


def compare(a: Stat, b: Stat) -> int | None:
    """+1 if a > b beyond the spread, -1 if a < b beyond it, 0 within it, None with < 2 seeds."""
    if a.n < 2 or b.n < 2:
        return None
    spread = 2 * max(a.sd, b.sd)
    diff = a.mean - b.mean
    return 0 if abs(diff) <= spread else (1 if diff > 0 else -1)


# ----------------------------------------------------------------------------- collecting


def collect(out: str | Path, preset: str) -> dict[str, Any]:
    """Everything the report needs, from the files under ``out``."""
    out = Path(out)
    jobs = rp.plan(preset, out)
    records = {j.name: _json(out / "jobs" / f"{j.name}.json") for j in jobs}
    systems = {j.name: j.system for j in jobs if j.system is not None}
    evals: list[dict[str, Any]] = []
    gaussian: dict[str, dict[str, Any]] = {}  # version -> study -> the input's Gaussian curve
    for j in jobs:
        if j.name.startswith("eval-"):
            result = _json(out / "eval" / j.name[len("eval-"):] / "evaluation.json")
            for row in (result or {}).get("rows", []):
                evals.append({**row, "version": result["version"]})
            for study, curve in (result or {}).get("gaussian", {}).items():
                gaussian.setdefault(result["version"], {}).setdefault(study, curve)
    summaries = {name: _json(out / name / "summary.json") for name in systems}
    return {"out": str(out), "preset": preset, "jobs": jobs, "records": records,
            "systems": systems, "evals": evals, "summaries": summaries, "gaussian": gaussian,
            "threshold": _json(out / "threshold" / "threshold.json"),
            "sim_report": _json(out / "data" / "report.json"),
            "datasets": _datasets(out / "data"),
            "provenance": _json(out / "reproduce.json")}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _datasets(folder: Path) -> dict[str, dict[str, Any]]:
    import h5py

    info: dict[str, dict[str, Any]] = {}
    for role in ("train", "finetune", "test", "online"):
        path = folder / f"{role}.h5"
        if not path.exists():
            continue
        with h5py.File(path, "r") as f:
            studies = sorted(k for k in f if k.startswith("study_"))
            bmi = [json.loads(f[s].attrs.get("attrs", "{}")).get("bmi_class", "") for s in studies]
            slices = int(f[studies[0]]["truth"].shape[0]) if studies else 0
            versions = f.attrs.get("versions", "[]")
            versions = (json.loads(versions) if isinstance(versions, str)
                        else [str(v) for v in np.atleast_1d(versions)])
        info[role] = {"studies": len(studies), "bmi": bmi, "slices": slices,
                      "versions": versions}
    return info


# ----------------------------------------------------------------------------- selecting


def _rows(c: Mapping[str, Any], label: str, *, version: str = "v2", bmi: str | None = None,
          network_is_input: bool = False) -> list[dict[str, Any]]:
    rows = []
    for r in c["evals"]:
        if r["version"] != version or (bmi is not None and r.get("bmi_class") != bmi):
            continue
        if network_is_input:
            if r["network"] == "input":
                rows.append(r)
            continue
        system = c["systems"].get(r["network"])
        if system is not None and system.label == label:
            rows.append(r)
    if network_is_input:  # the input row is repeated by every evaluation: keep one per study
        rows = list({r["study"]: r for r in rows}.values())
    return rows


def metric(c: Mapping[str, Any], label: str, key: str, *, version: str = "v2",
           bmi: str | None = "low", absolute: bool = False) -> Stat:
    """Mean ± sd over the seeds of a system; with ``bmi=None`` each network's value is first
    averaged over the test studies, so the sd stays a spread over seeds."""
    rows = _rows(c, label, version=version, bmi=bmi, network_is_input=label == "input")
    per_network: dict[str, list[float]] = {}
    for r in rows:
        value = _value(r, key)
        if value is not None:  # None: not measured (e.g. off the Gaussian curve)
            per_network.setdefault(r["network"], []).append(abs(value) if absolute else value)
    return stat(float(np.mean(v)) for v in per_network.values())


def gain_cell(c: Mapping[str, Any], label: str, key: str, *, bmi: str | None = "low",
              digits: int = 2) -> str:
    """:func:`metric` of a gain, saying how many of the system's networks it covers when
    some are off the Gaussian's range (their gain is not measured, so a mean over the
    others alone would look like every seed's): ``"+3.10 ± 0.20 (2 of 3 on the curve)"``."""
    gain = metric(c, label, key, bmi=bmi)
    networks = {r["network"] for r in _rows(c, label, bmi=bmi,
                                             network_is_input=label == "input")}
    text = fmt(gain, digits)  # "-" when none is on the curve
    if 0 < gain.n < len(networks):
        text += f" ({gain.n} of {len(networks)} on the curve)"
    return text


def _value(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``; a key ``a/b/c`` reads ``row[a][b][c]`` (None where any is missing)."""
    node: Any = row
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def network_metric(c: Mapping[str, Any], network: str, key: str, *, version: str = "v2",
                   bmi: str | None = "low") -> Stat:
    """:func:`metric` of ONE network (a job name, e.g. ``v2net-s0``), not of a system."""
    return stat(r[key] for r in c["evals"] if r["network"] == network
                and r["version"] == version and (bmi is None or r.get("bmi_class") == bmi))


def _labels(c: Mapping[str, Any], kind: str | None = None) -> list[str]:
    seen: list[str] = []
    for s in c["systems"].values():
        if (kind is None or s.kind == kind) and s.label not in seen:
            seen.append(s.label)
    return seen


def _summary_stat(c: Mapping[str, Any], label: str, fn) -> Stat:
    values = []
    for name, s in c["systems"].items():
        summ = c["summaries"].get(name)
        if s.label == label and summ:
            try:
                values.append(fn(summ))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
    return stat(values)


def _change(start_key: str, end_key: str):
    return lambda s: (s[end_key] - s[start_key]) / s[start_key] * 100


#: Forgetting: the held-out old-task (v1) loss at the end of fine-tuning vs its start (%).
FORGETTING = _change("initial_val_loss_old", "final_val_loss_old")


# ----------------------------------------------------------------------------- writing


def write(c: Mapping[str, Any], out: str | Path | None = None) -> Path:
    """Writes ``report.md`` and its figures into ``out`` (default: the reproduction's folder)."""
    out = Path(out or c["out"])
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(c, out, fig_dir)
    text = "\n".join(_sections(c, figures)) + "\n"
    workdir_lib.atomic_write_bytes(out / "report.md", text.encode())
    return out / "report.md"


def _sections(c: Mapping[str, Any], figures: Mapping[str, str]) -> list[str]:
    p = rp.PRESETS[c["preset"]]
    prov = c.get("provenance") or {}
    lines = [f"# Reproduction of Chen et al. (2021), preset `{c['preset']}`", ""]
    lines += [f"Written by `python reproduce.py --preset={c['preset']}` from the files under "
              f"`{c['out']}` only. {p.note}", ""]
    if prov:
        lines += [f"Machine: {prov.get('machine', '?')}. Started {prov.get('started', '?')}, "
                  f"wall time of the jobs run by the last invocation "
                  f"{prov.get('wall_s', 0) / 60:.1f} min with {prov.get('workers', '?')} "
                  f"parallel jobs; seeds {list(p.seeds)}.", ""]
    lines += ["## Datasets", "", "| role | studies | BMI (low/high) | slices | versions |",
              "|---|---|---|---|---|"]
    for role, d in c["datasets"].items():
        lines.append(f"| {role} | {d['studies']} | {d['bmi'].count('low')}/"
                     f"{d['bmi'].count('high')} | {d['slices']} | {', '.join(d['versions'])} |")
    checks = (c.get("sim_report") or {}).get("checks")
    if checks:
        passed = sum(1 for ch in checks.values() if (ch.get("pass") if isinstance(ch, dict)
                                                     else ch))
        lines += ["", f"Simulator checks (`data/report.json`): {passed} of {len(checks)} pass."]
    lines += ["", "## Verdict rules (fixed before the runs)", "", RULES]
    lines += _table1(c, figures)
    lines += _extra_metrics(c)
    lines += _losses(c, figures)
    lines += _forgetting(c)
    lines += _high_bmi(c)
    lines += _threshold(c, figures)
    lines += _online(c, figures)
    lines += _cost(c)
    lines += _claims(c)
    return lines


def _table1(c, figures) -> list[str]:
    labels = _labels(c, "train") + _labels(c, "finetune")
    headline = next((r["headline_lesion"] for r in c["evals"] if "headline_lesion" in r), None)
    lines = ["## Table 1: lesion bias and liver CoV on v2 test images", "",
             "Mean ± sd over seeds (n). The paper's values are for its low-BMI study. The "
             "lesion is the original 8-10 mm liver lesion (3-5 voxels); \"gain\" is the "
             "network's bias minus that of a Gaussian post-filter of the same input at the "
             "same liver CoV (points; > 0: it keeps more lesion than a blur of the same noise; "
             "\"-\": off the Gaussian's range).", "",
             "| network | n | low BMI: lesion bias % | gain | low BMI: liver CoV % | high BMI: "
             "lesion bias % | gain | high BMI: liver CoV % | paper: bias % | paper: CoV % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ["input", *labels]:
        lo_b = metric(c, label, "lesion_bias_pct")
        paper = PAPER_TABLE1.get(label)
        lines.append(
            f"| {label} | {lo_b.n} | {lo_b} | {gain_cell(c, label, 'gain_pct')} | "
            f"{metric(c, label, 'liver_cov_pct')} | "
            f"{metric(c, label, 'lesion_bias_pct', bmi='high')} | "
            f"{gain_cell(c, label, 'gain_pct', bmi='high')} | "
            f"{metric(c, label, 'liver_cov_pct', bmi='high')} | "
            f"{paper[0] if paper else ''} | {paper[1] if paper else ''} |")
    if headline and headline != "lesion_0":
        lines += ["", f"**The headline lesion, `{headline}`** (docs/simulator.md, section 7: "
                  "chosen before any network was measured on it), with the same gain:", "",
                  "| network | n | low BMI: bias % | gain | high BMI: bias % | gain |",
                  "|---|---|---|---|---|---|"]
        for label in ["input", *labels]:
            lines.append(
                f"| {label} | {metric(c, label, 'headline_bias_pct').n} | "
                f"{metric(c, label, 'headline_bias_pct')} | "
                f"{gain_cell(c, label, 'headline_gain_pct')} | "
                f"{metric(c, label, 'headline_bias_pct', bmi='high')} | "
                f"{gain_cell(c, label, 'headline_gain_pct', bmi='high')} |")
    for key in ("panel", "scatter"):
        if key in figures:
            lines += ["", f"![{key}]({figures[key]})"]
    return lines + [""] + _gains_by_size(c, labels)


def denoiser_verdict(c: Mapping[str, Any]) -> str:
    """One line: do the pretrained networks (v1-net on v1 images, v2-net on v2) keep more of
    the headline lesion and of every liver lesion of 10 mm or more than a Gaussian
    post-filter at the same liver CoV, beyond the seed spread (mean gain above twice its
    sd), in every test study? "" when nothing was measured."""
    checked, failed, unsure = 0, [], []
    for label, version in (("v1-net", "v1"), ("v2-net", "v2")):
        rows = _rows(c, label, version=version)
        names = sorted({n for r in rows for n, e in r.get("lesions", {}).items()
                        if e.get("organ") == "liver" and (e.get("diameter_mm") or 0) >= 10})
        keys = ["headline_gain_pct"] + [f"lesions/{n}/gain_bias_pct" for n in names]
        for bmi in ("low", "high"):
            for key in keys:
                g = metric(c, label, key, version=version, bmi=bmi)
                if g.n == 0:
                    continue
                checked += 1
                where = f"{label} {bmi} BMI {key.split('/')[1] if '/' in key else 'headline'}"
                if g.n < 2:
                    if g.mean <= 0:
                        failed.append(f"{where} {g.mean:+.1f}")
                    else:
                        unsure.append(where)
                elif g.mean <= 2 * g.sd:
                    failed.append(f"{where} {fmt(g, 1)}")
    if not checked:
        return ""
    head = (f"**Better than a blur?** {checked} gains of the pretrained networks over the "
            "Gaussian post-filter at matched CoV (the headline lesion and every liver lesion "
            "of 10 mm or more, each test study): ")
    if failed:
        return head + f"{len(failed)} not beyond the seed spread: " + "; ".join(failed) + "."
    if unsure:
        return head + ("all positive, with one seed (no spread to judge them against)." if
                       len(unsure) == checked else "all positive, some with one seed.")
    return head + "all beyond the seed spread."


def _gains_by_size(c, labels: Sequence[str]) -> list[str]:
    """Bias gain over the Gaussian per lesion (organ, size), per BMI class."""
    names = sorted({name for r in c["evals"] for name in r.get("lesions", {})},
                   key=lambda n: _lesion_key(c, n))
    if len(names) < 2:
        return []
    lines = ["## Against the Gaussian post-filter, per lesion size (v2 test images)", "",
             "Bias gain over a Gaussian post-filter of the same input at the network's liver "
             "CoV, in points, per lesion (mean ± sd over seeds; `lesion_0` is the original "
             "8-10 mm one). Small lesions (at most twice the ~6 mm resolution) are limited "
             "by partial volume in every method.", ""]
    verdict = denoiser_verdict(c)
    if verdict:
        lines += [verdict, ""]
    short = [n.replace("lesion_", "") for n in names]
    for bmi in ("low", "high"):
        lines += [f"**{bmi} BMI**", "", "| network | " + " | ".join(short) + " |",
                  "|---|" + "---|" * len(names)]
        for label in labels:
            cells = [gain_cell(c, label, f"lesions/{n}/gain_bias_pct", bmi=bmi, digits=1)
                     for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _lesion_key(c, name: str) -> tuple:
    entry = next((r["lesions"][name] for r in c["evals"] if name in r.get("lesions", {})), {})
    return (name != "lesion_0", entry.get("organ", ""), entry.get("diameter_mm") or 0.0)


def _extra_metrics(c) -> list[str]:
    labels = ["input", *_labels(c, "train"), *_labels(c, "finetune")]
    lines = ["## Against the truth and the reference (v2 test images)", "",
             "Bias against the true activity, contrast recovery (lesion/liver, 100 % = true), "
             "PSNR and SSIM in the body against the 600 s reference (dm-pix).", ""]
    for bmi in ("low", "high"):
        lines += [f"**{bmi} BMI**", "",
                  "| network | bias vs truth % | contrast recovery % | PSNR dB | SSIM |",
                  "|---|---|---|---|---|"]
        for label in labels:
            lines.append(
                f"| {label} | {metric(c, label, 'lesion_bias_truth_pct', bmi=bmi)} | "
                f"{fmt(metric(c, label, 'contrast_recovery_pct', bmi=bmi), 1)} | "
                f"{metric(c, label, 'psnr_db', bmi=bmi)} | "
                f"{fmt(metric(c, label, 'ssim', bmi=bmi), 4)} |")
        lines.append("")
    return lines


def _losses(c, figures) -> list[str]:
    lines = ["## Held-out losses", "",
             "Pretraining: held-out MSE of the training file's last study (its own version). "
             "Fine-tuning: new task = that study's v2 images (start -> best checkpoint), old "
             "task = its v1 images (start -> end); change in %.", "",
             "| network | n | retrained % | held-out MSE (best) | new task change % | "
             "old task change % | best step |", "|---|---|---|---|---|---|---|"]
    for label in _labels(c, "train"):
        lines.append(f"| {label} | {_summary_stat(c, label, lambda s: 1).n} | - | "
                     f"{fmt(_summary_stat(c, label, lambda s: s['best_val_loss']), 5)} | - | - | "
                     f"{fmt(_summary_stat(c, label, lambda s: s['best_step']), 0)} |")
    for label in _labels(c, "finetune"):
        lines.append(
            f"| {label} | {_summary_stat(c, label, lambda s: 1).n} | "
            f"{fmt(_summary_stat(c, label, lambda s: 100 * s['retrained_fraction']), 1)} | "
            f"{fmt(_summary_stat(c, label, lambda s: s['best_val_loss']), 5)} | "
            f"{fmt(_summary_stat(c, label, _change('initial_val_loss', 'best_val_loss')), 1)} | "
            f"{fmt(_summary_stat(c, label, FORGETTING), 1)} | "
            f"{fmt(_summary_stat(c, label, lambda s: s['best_step']), 0)} |")
    conv = _convergence(c)
    if conv:
        lines += ["", conv]
    if "pretraining" in figures:
        lines += ["", f"![pretraining]({figures['pretraining']})"]
    l2sp = _l2sp_choice(c)
    if l2sp:
        lines += ["", l2sp]
    if "curves" in figures:
        lines += ["", f"![curves]({figures['curves']})"]
    return lines + [""]


def _convergence(c) -> str:
    """Did pretraining converge? The last quarter's fall of the held-out loss
    (:func:`tgd_jax.train.metrics.plateau`)."""
    from tgd_jax.train.metrics import PLATEAU_FALL, plateau

    falls, settled = [], 0
    for name, s in c["systems"].items():
        if s.kind != "train":
            continue
        records = _metrics(Path(c["out"]) / name)
        steps = max((r["step"] for r in records if "val_loss" in r), default=0)
        try:
            p = plateau(records, steps)
        except ValueError:
            continue
        falls.append(100 * p["fall"])
        settled += p["plateau"]
    if not falls:
        return ""
    g = stat(falls)
    return (f"Convergence of pretraining: from the last validation at or before 75 % of the "
            f"steps to the end, the held-out loss fell by {fmt(g, 1)} % ({g.n} networks; "
            f"{settled} of them below {100 * PLATEAU_FALL:g} %, the plateau criterion).")


def _l2sp_choice(c) -> str:
    """How L2-SP's strength was chosen (``l2sp-select/strength.json``), if it was."""
    record = _json(Path(c["out"]) / "l2sp-select" / "strength.json")
    if not isinstance(record, dict) or "strength" not in record:
        return ""
    losses = ", ".join(f"{k}: {v:.5f}" for k, v in record.get("losses", {}).items())
    return (f"{rp.L2SP_LABEL}'s strength, chosen on the fine-tuning studies alone (full "
            f"fine-tuning of the first seed's v1-net with the last fine-tuning study held "
            f"out; the lowest held-out loss wins): **{record['strength']:g}** (held-out MSE "
            f"per strength: {losses}).")


def _pretraining(c, out: Path, path: Path) -> Path | None:
    """Held-out loss of every pretraining run against its step, the window the plateau
    criterion reads (its last quarter) shaded."""
    import matplotlib.pyplot as plt

    runs = {}
    for name, s in c["systems"].items():
        if s.kind == "train":
            recs = [r for r in _metrics(out / name) if "val_loss" in r]
            if recs:
                runs[(s.label, s.seed)] = recs
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    last = max(r["step"] for recs in runs.values() for r in recs)
    ax.axvspan(0.75 * last, last, color="0.9", label="last quarter (plateau criterion)")
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(k[0] for k in runs))}
    seeds = sorted({k[1] for k in runs})
    for (label, seed), recs in runs.items():
        ax.plot([r["step"] for r in recs], [r["val_loss"] for r in recs], marker=".",
                color=colours[label], linestyle=("-", "--", ":", "-.")[seeds.index(seed) % 4],
                label=f"{label}, seed {seed}")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("held-out MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    workdir_lib.save_figure(fig, path)
    return path


def _metrics(workdir: Path) -> list[dict[str, Any]]:
    """A run's records (a torn last line dropped); [] if unreadable."""
    from tgd_jax.train.metrics import read_metrics

    try:
        return read_metrics(workdir / "metrics.jsonl", log=lambda _: None)
    except (OSError, ValueError, TGDError):  # a damaged inner line: no curve, no crash
        return []


#: Columns of the per-network image-quality tables: (metric key, decimals).
QUALITY = (("lesion_bias_pct", 2), ("liver_cov_pct", 2), ("psnr_db", 2), ("ssim", 4))


def _quality_table(c, labels: Sequence[str], *, version: str, bmi: str | None) -> list[str]:
    """lesion bias, liver CoV, PSNR and SSIM per system (mean ± sd over seeds)."""
    lines = ["| network | lesion bias % | liver CoV % | PSNR dB | SSIM |", "|---|---|---|---|---|"]
    for label in labels:
        cells = [fmt(metric(c, label, key, version=version, bmi=bmi), digits)
                 for key, digits in QUALITY]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _forgetting(c) -> list[str]:
    return ["## Forgetting: the old task (v1 test images)", "",
            "Each fine-tuned network on the v1 images of the test studies, which no network "
            "saw, next to v1-net: each network's mean over the low- and the high-BMI study, "
            "then mean ± sd over seeds.", "",
            *_quality_table(c, ["input", "v1-net", *_labels(c, "finetune")], version="v1",
                            bmi=None), ""]


def _high_bmi(c) -> list[str]:
    return ["## High-BMI retention (v2 images of the high-BMI test study)", "",
            "Fine-tuning used low-BMI studies only; v1-net and v2-net saw both classes.", "",
            *_quality_table(c, ["input", *_labels(c, "train"), *_labels(c, "finetune")],
                            version="v2", bmi="high"), ""]


def _threshold(c, figures) -> list[str]:
    t = c.get("threshold")
    lines = ["## Threshold study (v1-net, first seed)", ""]
    if not t:
        return lines + ["Not run.", ""]
    lines += [f"Held-out loss with every kernel: {t['intact_loss']:.5f}. Zeroing the input "
              "channels of every kernel whose KSE is below phi, against as many chosen at random "
              f"({t['random_draws']} draws) or by lowest L1 norm:", "",
              "| phi | dropped % | loss change % (KSE) | random | L1 |", "|---|---|---|---|---|"]
    for r in t["rows"]:
        ch = [100 * (r[k]["loss"] - t["intact_loss"]) / t["intact_loss"]
              for k in ("kse", "random", "l1")]
        lines.append(f"| {r['phi']} | {100 * r['fraction']:.1f} | {ch[0]:+.1f} | {ch[1]:+.1f} | "
                     f"{ch[2]:+.1f} |")
    for key in ("threshold", "kse_hist"):
        if key in figures:
            lines += ["", f"![{key}]({figures[key]})"]
    return lines + [""]


def _online(c, figures) -> list[str]:
    lines = ["## Online learning on the OOD study (one seed)", "",
             "RMSE against the noiseless reconstruction within 3 pixels of each feature "
             "(feature plus ring), and the test-study metrics of the network before "
             "(its starting network) and after online learning.", "",
             "| network | from | retrained % | feature | RMSE input | RMSE before | RMSE after | "
             "low-BMI liver CoV before -> after | lesion bias before -> after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in c["systems"].items():
        if s.kind != "online":
            continue
        summ = c["summaries"].get(name) or {}
        start_label = c["systems"][s.start].label
        cov = (network_metric(c, s.start, "liver_cov_pct"),
               network_metric(c, name, "liver_cov_pct"))
        bias = (network_metric(c, s.start, "lesion_bias_pct"),
                network_metric(c, name, "lesion_bias_pct"))
        for roi, e in (summ.get("ood_rmse") or {}).items():
            lines.append(
                f"| {s.label} | {start_label} (seed {s.seed}) | "
                f"{100 * summ.get('retrained_fraction', math.nan):.1f} | {roi} | "
                f"{e['input']:.3f} | {e['starting network']:.3f} | {e['online']:.3f} | "
                f"{fmt(cov[0])} -> {fmt(cov[1])} | {fmt(bias[0])} -> {fmt(bias[1])} |")
    for key in ("online_tgdn2n", "online_tgd2n2n", "online_n2nfull"):
        if key in figures:
            lines += ["", f"![{key}]({figures[key]})"]
    return lines + [""]


def cost(c: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Studies, data preparation and training seconds behind each system.

    Data preparation is charged per study and version from the simulator's measured time
    (the ``train`` role simulates both versions; ``finetune`` only v2). A fine-tuned
    network's own cost excludes v1-net, which existed before (as in the paper).
    """
    ds, rec = c["datasets"], c["records"]
    per_study: dict[str, float] = {}
    for role in ("train", "finetune"):
        r, d = rec.get(f"sim-{role}"), ds.get(role)
        if r and d and d["studies"]:
            per_study[role] = r["wall_s"] / (d["studies"] * max(1, len(d["versions"])))
    out: dict[str, dict[str, float]] = {}
    for label in _labels(c, "train") + _labels(c, "finetune"):
        walls, studies, role = [], math.nan, ""
        for name, s in c["systems"].items():
            if s.label != label or not rec.get(name):
                continue
            walls.append(rec[name]["wall_s"])
            summ = c["summaries"].get(name) or {}
            studies = len(summ.get("train_studies", [])) or studies
            role = "train" if s.kind == "train" else "finetune"
        if walls:
            data_s = per_study.get(role, math.nan) * studies
            out[label] = {"studies": studies, "data_s": data_s, "train_s": float(np.mean(walls)),
                          "total_s": data_s + float(np.mean(walls))}
    return out


def _cost(c) -> list[str]:
    lines = ["## Cost", "",
             "Studies used for training, simulated data preparation (measured simulator time "
             "per study and version x studies) and training wall time (one job, one JAX "
             "device; mean over seeds). v1-net's cost is not charged to the fine-tuned "
             "networks.", "",
             "| network | studies | data s | training s | total s |", "|---|---|---|---|---|"]
    for label, k in cost(c).items():
        lines.append(f"| {label} | {k['studies']} | {k['data_s']:.0f} | {k['train_s']:.0f} | "
                     f"{k['total_s']:.0f} |")
    return lines + [""]


# ----------------------------------------------------------------------------- claims


#: The verdict of a comparison that needs a seed spread, with one seed.
ONE_SEED = "not measurable here (one seed)"


def claims(c: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) per claim of the paper, by the rules in :data:`RULES`."""
    result = []
    seeds = len(rp.PRESETS[c["preset"]].seeds)

    # 1. On par with v2-net.
    b_t, b_2 = (metric(c, lab, "lesion_bias_pct", absolute=True) for lab in ("TGD-net", "v2-net"))
    v_t, v_2 = (metric(c, lab, "liver_cov_pct") for lab in ("TGD-net", "v2-net"))
    cb, cv = compare(b_t, b_2), compare(v_t, v_2)
    if cb is None or cv is None:
        v = ONE_SEED
    else:
        v = "supported" if cb <= 0 and cv <= 0 else "not supported"
    result.append(("TGD-net performs on par with v2-net on the low-BMI test study (lesion bias, "
                   "liver CoV).", v,
                   f"|bias| {fmt(b_t)} vs {fmt(b_2)} %, CoV {fmt(v_t)} vs {fmt(v_2)} % "
                   f"(TGD-net vs v2-net, {seeds} seeds)"))
    # 2. Cost.
    k = cost(c)
    if "TGD-net" in k and "v2-net" in k:
        saving = 100 * (1 - k["TGD-net"]["total_s"] / k["v2-net"]["total_s"])
        cheaper = saving > 0
        v = ("supported" if cheaper and result[0][1] == "supported" else
             f"not supported (the cost half {'holds' if cheaper else 'fails too'}; the "
             "accuracy half, claim 1, does not)" if result[0][1] == "not supported" else
             "cost measured; the accuracy half is not measurable here")
        result.append(("TGD-net reaches v2-net's accuracy with about a third of the studies and "
                       "64 % less data-preparation + training time.", v,
                       f"{k['TGD-net']['studies']} vs {k['v2-net']['studies']} studies, "
                       f"{k['TGD-net']['total_s']:.0f} vs {k['v2-net']['total_s']:.0f} s: "
                       f"{saving:.0f} % less"))
    # 3. Table 1 ordering: TGD-net's lesion bias is the smallest.
    b_f, b_1 = (metric(c, lab, "lesion_bias_pct", absolute=True) for lab in ("FT-net", "v1-net"))
    cf, c1 = compare(b_t, b_f), compare(b_t, b_1)
    v = (ONE_SEED if cf is None or c1 is None else
         "supported" if cf < 0 and c1 < 0 else "not supported")
    result.append(("TGD-net has a smaller lesion bias than FT-net and v1-net on v2 images "
                   "(Table 1).", v,
                   f"|bias| TGD-net {fmt(b_t)}, FT-net {fmt(b_f)}, v1-net {fmt(b_1)} %"))
    # 4. High BMI.
    hb = {lab: metric(c, lab, "lesion_bias_pct", bmi="high", absolute=True)
          for lab in ("TGD-net", "FT-net", "v1-net")}
    hv = {lab: metric(c, lab, "liver_cov_pct", bmi="high") for lab in ("TGD-net", "FT-net",
                                                                       "v1-net")}
    cmps = [compare(hb["TGD-net"], hb["v1-net"]), compare(hv["TGD-net"], hv["v1-net"])]
    v = (ONE_SEED if None in cmps else
         "supported" if all(x <= 0 for x in cmps) else "not supported")
    result.append(("TGD-net, fine-tuned on low-BMI studies only, keeps v1-net's performance on "
                   "the high-BMI patient.", v,
                   "high BMI |bias| / CoV %: " + "; ".join(
                       f"{lab} {fmt(hb[lab])} / {fmt(hv[lab])}" for lab in hb)))
    # 5. Forgetting.
    f_t = _summary_stat(c, "TGD-net", FORGETTING)
    f_f = _summary_stat(c, "FT-net", FORGETTING)
    if f_t.n < 2:
        v = ONE_SEED
    else:
        v = "supported" if f_t.mean <= 2 * f_t.sd else "not supported"
    result.append(("TGD learns the new task without forgetting the old one (no old data "
                   "used).", v, f"held-out v1 loss change: TGD-net {fmt(f_t, 1)} %, FT-net "
                   f"{fmt(f_f, 1)} %"))
    # 6. Threshold study.
    t = c.get("threshold")
    if t:
        row = min(t["rows"], key=lambda r: abs(r["phi"] - 0.5))
        change = 100 * (row["kse"]["loss"] - t["intact_loss"]) / t["intact_loss"]
        result.append(("Dropping the kernels with KSE below about 0.5 (half of them) leaves the "
                       "network's output nearly unchanged, so those kernels are useless.",
                       "supported" if change < 2 else "not supported",
                       f"phi {row['phi']}: {100 * row['fraction']:.1f} % dropped, held-out loss "
                       f"{change:+.1f} % (paper: 51 % dropped, output resembles the original)"))
    # 7-9. Online.
    for name, claim in (("tgdn2n", "TGD_N2N-net (online TGD from v2-net, phi 0.4) removes the "
                         "hallucinations on the OOD features while keeping liver noise "
                         "similar."),
                        ("tgd2n2n", "TGD^2_N2N-net (a second TGD round from TGD-net) does the "
                         "same.")):
        s = c["systems"].get(name)
        summ = c["summaries"].get(name) or {}
        ood = summ.get("ood_rmse") or {}
        if s is None or not ood:
            continue
        drops = {roi: 100 * (1 - e["online"] / e["starting network"]) for roi, e in ood.items()}
        start = f"{c['systems'][s.start].label}, seed {s.seed}"
        cov0, cov1 = (network_metric(c, s.start, "liver_cov_pct"),
                      network_metric(c, name, "liver_cov_pct"))
        cov_move = 100 * abs(cov1.mean - cov0.mean) / cov0.mean if cov0.n else math.nan
        ok = all(d > 10 for d in drops.values()) and cov_move < 10
        result.append((claim, "supported" if ok else "not supported",
                       "OOD RMSE drop " + ", ".join(f"{r} {d:.0f} %" for r, d in drops.items())
                       + f"; low-BMI liver CoV {fmt(cov0)} -> {fmt(cov1)} % "
                       f"(starting network {start}; one seed)"))
    s = c["systems"].get("n2nfull")
    if s is not None and c["systems"].get("tgdn2n") is not None:
        shift = {}
        for name in ("tgdn2n", "n2nfull"):
            start = c["systems"][name].start
            shift[name] = abs(network_metric(c, name, "psnr_db").mean
                              - network_metric(c, start, "psnr_db").mean)
        result.append(("Why TGD for online learning: retraining only useless kernels keeps the "
                       "rest of the network's behaviour, where N2N of all weights would not.",
                       "supported" if shift["tgdn2n"] < shift["n2nfull"] else "not supported",
                       f"low-BMI test PSNR moved {shift['tgdn2n']:.2f} dB with TGD_N2N vs "
                       f"{shift['n2nfull']:.2f} dB with N2N of all weights (one seed)"))
    return result


def _claims(c) -> list[str]:
    lines = ["## The paper's claims", ""]
    now = claims(c)
    for i, (claim, verdict, evidence) in enumerate(now, 1):
        lines.append(f"{i}. **{verdict[0].upper() + verdict[1:]}.** {claim} Measured: "
                     f"{evidence}.")
    before = c.get("before")
    if before:
        lines += ["", "## Before and after", "",
                  f"Each claim's verdict and key figure in the earlier report "
                  f"(`{before['path']}`) and in this one, judged by the same rules.", "",
                  "| claim | before | after |", "|---|---|---|"]
        for i, (claim, verdict, evidence) in enumerate(now, 1):
            old = next((b for b in before["claims"] if b["claim"] == claim), None)
            was = f"{old['verdict']}: {old['evidence']}" if old else "(not in it)"
            lines.append(f"| {i}. {claim} | {was} | {verdict}: {evidence} |")
    return lines + [""]


def with_before(c: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``c`` with the claims of an earlier ``report.json`` to compare against."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot read it as a report.json ({error})") from None
    if not isinstance(record, dict) or "claims" not in record:
        raise UsageError(f"{path}: not a report.json (no 'claims')")
    return {**c, "before": {"path": str(path), "claims": record["claims"]}}


# ----------------------------------------------------------------------------- figures


def _figures(c: Mapping[str, Any], out: Path, fig_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    figures: dict[str, str] = {}
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731
    seed0 = rp.PRESETS[c["preset"]].seeds[0]
    panel = _panel(c, out, fig_dir / "panel.png", seed0)
    if panel:
        figures["panel"] = rel(panel)
    if c["evals"]:
        figures["scatter"] = rel(_scatter(c, fig_dir / "bias_vs_cov.png"))
    pretraining = _pretraining(c, out, fig_dir / "pretraining.png")
    if pretraining:
        figures["pretraining"] = rel(pretraining)
    curves = _curves(c, out, fig_dir / "curves.png", seed0)
    if curves:
        figures["curves"] = rel(curves)
    for key, src in (("threshold", out / "threshold" / "threshold.png"),
                     ("kse_hist", out / f"tgdnet-s{seed0}" / "kse_hist.png"),
                     ("online_tgdn2n", out / "tgdn2n" / "online.png"),
                     ("online_tgd2n2n", out / "tgd2n2n" / "online.png"),
                     ("online_n2nfull", out / "n2nfull" / "online.png")):
        if src.exists():
            dst = fig_dir / f"{key}.png"
            shutil.copyfile(src, dst)
            figures[key] = rel(dst)
    return figures


def _panel(c, out: Path, path: Path, seed: int) -> Path | None:
    import matplotlib.pyplot as plt

    order = [("input", None), ("v1-net", "v1net"), ("v2-net", "v2net"), ("FT-net", "ftnet"),
             ("TGD-net", "tgdnet")]
    images, titles = [], []
    study = next((r["study"] for r in c["evals"] if r.get("bmi_class") == "low"
                  and r["version"] == "v2"), None)
    if study is None:
        return None
    for label, prefix in order:
        name = "input" if prefix is None else f"{prefix}-s{seed}"
        # The seed's v2 evaluation holds every network's slice, and the input's.
        npz = out / "eval" / f"s{seed}-v2"
        try:
            with np.load(npz / "examples.npz") as f:
                images.append(f[f"{name}/{study}"])
        except (OSError, KeyError):
            continue
        row = next((r for r in c["evals"] if r["network"] == name and r["study"] == study
                    and r["version"] == "v2"), None)
        titles.append(f"{label}\nbias {row['lesion_bias_pct']:.1f} %, CoV "
                      f"{row['liver_cov_pct']:.1f} %" if row else label)
    if not images:
        return None
    vmax = float(np.percentile(images[0], 99.5))
    # Crop to the body (pixels above 5 % of the input's maximum), with a small margin.
    ys, xs = np.nonzero(images[0] > 0.05 * images[0].max())
    crop = ((slice(max(0, ys.min() - 4), ys.max() + 5), slice(max(0, xs.min() - 4),
                                                               xs.max() + 5))
            if ys.size else (slice(None), slice(None)))
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.0))
    for ax, image, title in zip(np.atleast_1d(axes), images, titles, strict=True):
        ax.imshow(image[crop], cmap="gray_r", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"v2 test study {study} (low BMI), one 60 s realisation, seed {seed}",
                 fontsize=9)
    workdir_lib.save_figure(fig, path)
    return path


def _scatter(c, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    markers = "osD^v<>ph*XP"
    for ax, bmi in zip(axes, ("low", "high"), strict=True):
        for i, label in enumerate(["input", *_labels(c)]):
            rows = _rows(c, label, bmi=bmi, network_is_input=label == "input")
            if rows:
                ax.scatter([r["liver_cov_pct"] for r in rows],
                           [r["lesion_bias_pct"] for r in rows],
                           marker=markers[i % len(markers)], label=label, alpha=0.8)
        study = next((r["study"] for r in c["evals"] if r.get("bmi_class") == bmi
                      and r["version"] == "v2"), None)
        curve = c.get("gaussian", {}).get("v2", {}).get(study)
        if curve:  # the field's baseline: the input through Gaussians of sigma 0-5 px
            ax.plot(curve["liver_cov_pct"], curve["lesion_0/bias_pct"], "k-", lw=0.8,
                    label="Gaussian post-filter")
        if bmi == "low":
            for label, (b, v) in PAPER_TABLE1.items():
                ax.scatter([v], [b], marker="x", color="k", s=20)
                ax.annotate(f"paper {label}", (v, b), fontsize=6)
        ax.set_xlabel("liver CoV %")
        ax.set_ylabel("lesion bias %")
        ax.set_title(f"v2 test images, {bmi} BMI (every seed)", fontsize=9)
        ax.axhline(0, color="0.8", lw=0.5)
    axes[1].legend(fontsize=6, loc="best")
    workdir_lib.save_figure(fig, path)
    return path


def _curves(c, out: Path, path: Path, seed: int) -> Path | None:
    import matplotlib.pyplot as plt

    series = {}
    for name, s in c["systems"].items():
        if s.kind == "finetune" and s.seed == seed:
            recs = [r for r in _metrics(out / name) if "val_loss" in r]
            if recs:
                series[s.label] = recs
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, recs in series.items():
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [r["val_loss"] for r in recs], label=label)
        if "val_loss_old" in recs[0]:
            axes[1].plot(steps, [r.get("val_loss_old", math.nan) for r in recs], label=label)
    axes[0].set_title("new task: held-out v2 MSE", fontsize=9)
    axes[1].set_title("old task: held-out v1 MSE", fontsize=9)
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    workdir_lib.save_figure(fig, path)
    return path


def write_json(c: Mapping[str, Any], path: Path) -> None:
    """The report's numbers as JSON (claims and cost)."""
    workdir_lib.write_json(path, {"claims": [dict(zip(("claim", "verdict", "evidence"), x,
                                                       strict=True)) for x in claims(c)],
                                  "cost": cost(c)})
