r"""The paper end to end, in one resumable command, and its measured report.

  python reproduce.py --preset=demo            # `make demo`: minutes on 2 CPU cores
  python reproduce.py --preset=study           # the CPU-scale comparison, 3 seeds
  python reproduce.py --preset=paper --jobs=1  # the paper's scale, for a GPU
  python reproduce.py --preset=study --report_only  # rewrite report.md from the files

Stages: datasets (+ the simulator's report), v1-net and v2-net per seed, the threshold
study, fine-tuning (FT-net, TGD-net, random mask per seed; full, paper-mode TGD, L1 mask),
online learning (TGD_N2N-net, TGD^2_N2N-net, N2N of all weights), evaluation of every
network, then ``runs/<preset>/report.md``. Each stage is one command of this repository,
logged in ``runs/<preset>/logs/``; rerunning skips what finished and resumes the rest.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import flags

from tgd_jax.io import errors
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import report as report_lib
from tgd_jax.pet import reproduce as rp
from tgd_jax.pet.models import MODELS

_PRESET = flags.DEFINE_enum("preset", "demo", sorted(rp.PRESETS), "Scale of the reproduction.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default runs/<preset>).")
_JOBS = flags.DEFINE_integer("jobs", 0, "Jobs at a time (0: one per CPU core up to 4 on a "
                             "CPU-only machine, 1 with a GPU).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite report.md.")
_TINY = flags.DEFINE_bool("tiny", False, "The preset's jobs and seeds at the test suite's "
                          "sizes (default output runs/<preset>-tiny): a quick trial on a CPU.")
_BEFORE = flags.DEFINE_string("before", None, "An earlier report.json: the report adds a "
                              "table of each claim's verdict before and now.")
_MODEL = flags.DEFINE_enum("model", "dncnn", list(MODELS), "The denoiser of every network "
                           "(default output runs/<preset>-<model> for other than dncnn).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the traceback.")


def main(argv: list[str]) -> None:
    with errors.reported("reproduce.py", verbose=_VERBOSE.value):
        if len(argv) > 1:
            raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
        if _JOBS.value < 0:
            raise errors.UsageError(f"--jobs must be >= 0, got {_JOBS.value}")
        suffix = ("" if _MODEL.value == "dncnn" else f"-{_MODEL.value}") + (
            "-tiny" if _TINY.value else "")
        out = Path(_OUT.value or f"runs/{_PRESET.value}{suffix}")
        # One reproduction per folder: a second one would start the same jobs on the
        # same workdirs. The jobs' commands lock their own workdirs too.
        if _REPORT_ONLY.value and not out.is_dir():
            _no_reproduction(out)
        with workdir_lib.lock_folder(out, "reproduce.py"):
            if _REPORT_ONLY.value and not (out / "jobs").is_dir():  # in use is said first
                _no_reproduction(out)
            jobs = rp.plan(_PRESET.value, out.resolve(), model=_MODEL.value, tiny=_TINY.value)
            if not _REPORT_ONLY.value:
                gpus = _gpu_names()
                preset_workers = 0 if _TINY.value else rp.PRESETS[_PRESET.value].workers
                workers = _JOBS.value or preset_workers or default_workers(gpus)
                if workers > 1 and gpus:  # jobs share the GPU: no process may take it all
                    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
                where = machine(gpus)
                t0 = time.monotonic()
                started = time.strftime("%Y-%m-%dT%H:%M:%S")
                print(f"reproduce.py --preset={_PRESET.value}: {where}; output in {out}/",
                      flush=True)
                records = rp.run(jobs, out.resolve(), workers=workers,
                                 log=lambda m: print(m, flush=True))
                workdir_lib.write_json(out / "reproduce.json", {
                    "preset": _PRESET.value, "started": started, "machine": where,
                    "workers": workers, "wall_s": time.monotonic() - t0,
                    "python": sys.version.split()[0], "command": " ".join(sys.argv),
                    "jobs": {name: {"wall_s": r["wall_s"], "cpu_s": r.get("cpu_s"),
                                    "finished": r["finished"]}
                             for name, r in records.items()}})
            collected = report_lib.collect(out, _PRESET.value)
            if _BEFORE.value:
                collected = report_lib.with_before(collected, _BEFORE.value)
            path = report_lib.write(collected, out)
            report_lib.write_json(collected, out / "report.json")
    print(f"wrote {path}")
    for i, (claim, verdict, evidence) in enumerate(report_lib.claims(collected), 1):
        print(f"{i}. [{verdict}] {claim}\n   {evidence}")


def _no_reproduction(out: Path) -> None:
    raise errors.UsageError(f"{out}: holds no reproduction (no {out / 'jobs'}/); "
                            "--report_only rewrites the report of one that ran")


def default_workers(gpus: list[str]) -> int:
    """One job per core (up to 4) on a CPU-only machine; 1 when a GPU is visible (jobs would
    compete for its memory)."""
    if gpus:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln for ln in result.stdout.splitlines() if ln.startswith("GPU")]


def machine(gpus: list[str]) -> str:
    """The CPU model and core count (and the GPUs), without starting JAX here."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    return text + (f", {'; '.join(gpus)}" if gpus else "")


def run() -> None:
    """The console script ``tgd-reproduce`` (and ``python -m tgd_jax.pet.commands.reproduce``)."""
    errors.run_command(__name__, main)


if __name__ == "__main__":
    run()
