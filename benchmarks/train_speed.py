r"""Steps/s of the demo config's training command, per Python (jax version), CPU device
count and step dispatch: what `train.py --config=configs/train.py:demo` does on this
machine, every process fresh.

    python -m benchmarks.train_speed --pythons=.venv/bin/python,.venv312/bin/python

A row per (python, devices, in flight): ``auto`` is the default
(:func:`tgd_jax.train.parallel.one_step_in_flight`), ``1`` waits for each step, ``0``
never does. The figure is the median of the progress records' steps/s after the first
(which holds the compilation). The data: ``--data`` or the simulator's demo training set
made once under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent.parent / "tgd_jax" / "pet" / "configs"


def demo_data(out: Path) -> Path:
    """The simulator's demo training set under ``out`` (made once)."""
    path = out / "data" / "train.h5"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "tgd_jax.sim", "--preset=demo", "--role=train",
                        f"--out={path.parent}"], check=True, capture_output=True)
    return path


def version(python: str) -> dict[str, str]:
    code = ("import jax, jaxlib, sys, json; print(json.dumps({'python': sys.version.split()[0], "
            "'jax': jax.__version__, 'jaxlib': jaxlib.__version__}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def measure(python: str, devices: int, in_flight: str, data: Path, steps: int,
            xla_flags: str = "") -> dict[str, Any]:
    """One fresh training run: its steps/s (median after the first record) and wall time."""
    env = {**os.environ, "TGD_CPU_DEVICES": str(devices), "TGD_COMPILATION_CACHE": "off",
           "XLA_FLAGS": xla_flags}
    if in_flight != "auto":
        env["TGD_ONE_STEP_IN_FLIGHT"] = in_flight
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        subprocess.run([python, "-m", "tgd_jax.pet.commands.train",
                        f"--config={CONFIGS / 'train.py'}:demo", f"--workdir={workdir}",
                        f"--config.data.path={data}", f"--config.num_steps={steps}",
                        f"--config.eval_every={steps}", "--config.log_every=50"],
                       env=env, check=True, capture_output=True, text=True)
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                   .splitlines()]
        summary = json.loads((workdir / "summary.json").read_text())
    rates = [r["steps_per_s"] for r in records if "steps_per_s" in r][1:]
    return {"devices": devices, "in_flight": in_flight, "xla_flags": xla_flags, "steps": steps,
            "steps_per_s": statistics.median(rates), "records": len(rates),
            "wall_s": summary["wall_s_this_invocation"]}


def run(pythons: list[str], devices: list[int], in_flight: list[str], steps: int,
        out: Path, data: Path | None = None, xla_flags: str = "") -> dict[str, Any]:
    data = data or demo_data(out)
    rows = []
    for python in pythons:
        about = version(python)
        for n in devices:
            for mode in in_flight:
                if n == 1 and mode != "auto":
                    continue  # one device: nothing to wait for
                row = {**about, **measure(python, n, mode, data, steps, xla_flags)}
                print(f"  python {row['python']} jax {row['jax']}, {n} device(s), in flight "
                      f"{mode}: {row['steps_per_s']:.1f} steps/s", flush=True)
                rows.append(row)
    return {"rows": rows, "data": str(data)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| jax (Python) | devices | one step in flight | steps/s |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['jax']} ({r['python']}) | {r['devices']} | {r['in_flight']} | "
                     f"{r['steps_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pythons", default=sys.executable,
                        help="comma-separated interpreters, each with tgd_jax installed")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--in_flight", default="auto,1,0")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--data", default="")
    parser.add_argument("--xla_flags", default="", help="XLA_FLAGS of every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run([p for p in args.pythons.split(",") if p],
                 [int(d) for d in args.devices.split(",")], args.in_flight.split(","),
                 args.steps, out, Path(args.data) if args.data else None, args.xla_flags)
    (out / "train_speed.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
