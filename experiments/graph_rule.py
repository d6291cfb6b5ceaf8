r"""The rule on a graph: how should a map read by several layers be scored? And do a UNet
and a residual network have more idle kernels than the DnCNN?

  python experiments/graph_rule.py --demo=runs/demo --out=runs/graph_rule

For the UNet and the residual denoiser of ``tgd_jax.pet.models``, trained exactly as the
demo preset trains its v1-net (quarter width, 800 steps, seed 0, the demo's ``train.h5``):

1. ``train.py --config=configs/train.py:demo --config.model.name=<model> ...``;
2. ``threshold.py --combine=max|mean|min`` on each (the held-out study's v1 images);
3. ``graph_rule.md`` and ``graph_rule.png``: per phi the fraction of parameters dropped and
   the held-out loss with them zeroed (KSE / random / L1), next to the DnCNN's threshold
   study (``--demo``: the output of ``make demo``, whose ``threshold/threshold.json`` is
   the DnCNN v1-net's, and whose ``data/`` the networks here train on). One seed:
   differences within the random draws' spread are no finding.

Finished steps are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

_DEMO = flags.DEFINE_string("demo", "runs/demo", "Output folder of `make demo` (its data and "
                            "its DnCNN v1-net's threshold study).")
_OUT = flags.DEFINE_string("out", "runs/graph_rule", "Output folder.")

MODELS = ("unet", "resnet")
COMBINES = ("max", "mean", "min")
REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str]) -> None:
    print("+", " ".join(argv), flush=True)
    # One CPU device, as the demo preset's jobs (reproduce.py): the published numbers'.
    env = {**os.environ, "TGD_CPU_DEVICES": os.environ.get("TGD_CPU_DEVICES", "1")}
    subprocess.run([sys.executable, *argv], check=True, cwd=REPO, env=env)


def runs(data: Path, out: Path) -> None:
    for model in MODELS:
        workdir = out / f"v1net-{model}-s0"
        if not (workdir / "summary.json").exists():
            _run(["train.py", "--config=configs/train.py:demo", f"--config.model.name={model}",
                  f"--config.data.path={data}/train.h5", "--config.data.version=v1",
                  "--config.seed=0", "--config.eval_every=400", "--config.num_steps=800",
                  f"--workdir={workdir}"])
        for combine in COMBINES:
            target = out / f"threshold-{model}-{combine}"
            if not (target / "threshold.json").exists():
                _run(["threshold.py", f"--checkpoint={workdir}", f"--data={data}/train.h5",
                      "--version=v1", "--studies=1", f"--combine={combine}", f"--out={target}"])


def report(out: Path, demo: Path) -> str:
    studies = {"DnCNN": json.loads((demo / "threshold" / "threshold.json").read_text())}
    losses = {"DnCNN": json.loads((demo / "v1net-s0" / "summary.json").read_text())[
        "best_val_loss"]}
    for model in MODELS:
        for combine in COMBINES:
            studies[f"{model} ({combine})"] = json.loads(
                (out / f"threshold-{model}-{combine}" / "threshold.json").read_text())
        losses[model] = json.loads((out / f"v1net-{model}-s0" / "summary.json").read_text())[
            "best_val_loss"]
    lines = ["# The rule on a graph, and idle kernels in a UNet and a residual network", "",
             "`python experiments/graph_rule.py` (one seed; demo data and recipe: quarter "
             "width, 800 steps). Held-out v1 MSE of the pretrained networks: "
             + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()) + ".", "",
             "Per phi: parameters dropped (zeroed) by the rule, and the held-out loss with "
             "them zeroed as a change from the intact network's, for the KSE choice, the same "
             "per-layer counts at random (mean ± sd of 3 draws) and the lowest-L1 filters.", "",
             "| network (combine) | phi | dropped % | KSE | random | L1 |",
             "|---|---|---|---|---|---|"]
    def pct(value: float, intact: float) -> str:
        return f"{100 * (value / intact - 1):+.0f} %"

    for name, study in studies.items():
        intact = study["intact_loss"]
        for row in study["rows"]:
            r = row["random"]
            lines.append(f"| {name} | {row['phi']:.1f} | {100 * row['fraction']:.1f} | "
                         f"{pct(row['kse']['loss'], intact)} | {pct(r['loss'], intact)} ± "
                         f"{100 * r.get('loss_sd', 0) / intact:.0f} | "
                         f"{pct(row['l1']['loss'], intact)} |")
    (out / "graph_rule.md").write_text("\n".join(lines) + "\n")
    (out / "graph_rule.json").write_text(json.dumps({"losses": losses, "studies": studies}))
    _figure(studies, out / "graph_rule.png")
    return "\n".join(lines)


def _figure(studies: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for name, study in studies.items():
        if name.endswith(("(mean)", "(min)")) and not name.startswith("resnet"):
            continue
        phis = [r["phi"] for r in study["rows"]]
        style = "-" if "(" not in name or name.endswith("(max)") else ":"
        line, = a.plot(phis, [100 * r["fraction"] for r in study["rows"]], "o" + style,
                       label=name, ms=3)
        b.plot(phis, [r["kse"]["loss"] / study["intact_loss"] for r in study["rows"]],
               "o" + style, color=line.get_color(), ms=3, label=f"{name}, KSE")
        if "(" not in name or name.endswith("(max)"):
            b.plot(phis, [r["random"]["loss"] / study["intact_loss"] for r in study["rows"]],
                   "x--", color=line.get_color(), ms=3, alpha=0.6, label=f"{name}, random")
    a.set(xlabel="phi", ylabel="parameters dropped (%)", ylim=(0, 70))
    b.set(xlabel="phi", ylabel="held-out loss / intact", yscale="log")
    a.legend(fontsize=6)
    b.legend(fontsize=5, ncol=2)
    fig.suptitle("Threshold study: DnCNN, UNet and residual network (combine rule)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(_DEMO.value)
    runs((demo / "data").resolve(), out.resolve())
    print(report(out, demo))


if __name__ == "__main__":
    app.run(main)
