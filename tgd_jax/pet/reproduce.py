"""The paper end to end: every system of Chen et al. (2021) as a graph of resumable jobs.

A preset (:data:`PRESETS`) fixes the scale; :func:`plan` turns it into :class:`Job` s, each
one run of a command of this repository (``python -m tgd_jax.sim``, ``train.py``,
``finetune.py``, ``online.py``, ``threshold.py``, ``evaluate.py``), and :func:`run` executes
them in dependency order, several at a time, each in its own process on one JAX device (on
a CPU-only machine that keeps every core busy, and every network is the one its command
alone would make). Everything lands in ``runs/<preset>/``:

* ``data/<role>.h5`` the simulated datasets, ``<network>/`` one workdir per network,
  ``eval/s<seed>-<version>/`` the test metrics of every network of that seed (one
  evaluation process each), ``logs/<job>.log`` each job's output;
* ``jobs/<job>.json`` written when a job succeeds: its command line, wall time and CPU
  seconds. A job whose record holds the same command line is skipped; a job that was
  killed is rerun and its command resumes from its last checkpoint; a finished job whose
  input job is missing or newer is refused as out of date (its outputs would otherwise
  be reused);
* ``reproduce.json`` (preset, versions, every job's wall time and CPU seconds) and
  ``report.md`` with its figures (:mod:`tgd_jax.pet.report`), written from those files
  only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import RunError, UsageError
from tgd_jax.pet.models import MODELS

__all__ = ["Preset", "PRESETS", "Job", "System", "plan", "run", "at_tiny_scale"]

#: The commands' configs, inside the package (tgd_jax/pet/configs; not imported from
#: ``cli``, whose flags would clash with the reproduce command's own).
_CONFIGS = Path(__file__).resolve().parent / "configs"


def _module(command: str) -> tuple[str, str]:
    """How a job runs a command: its module (no repository paths, so an installed package
    reproduces too)."""
    return ("-m", f"tgd_jax.pet.commands.{command}")


def _canonical(argv: Sequence[str]) -> list[str]:
    """A job's command line without the interpreter, with a command's module written as
    the script it was before commands moved into the package (``train.py``), so records
    of either form name the same job."""
    args = list(argv[1:])
    if args[:1] == ["-m"] and len(args) > 1 and args[1].startswith("tgd_jax.pet.commands."):
        args = [args[1].rsplit(".", 1)[1] + ".py", *args[2:]]
    # the package's config by its absolute path (where the package is installed), as the
    # checkout-relative path of the records made before
    prefix = f"--config={_CONFIGS}/"
    return [f"--config=configs/{a[len(prefix):]}" if a.startswith(prefix) else a for a in args]


@dataclasses.dataclass(frozen=True)
class Preset:
    """The scale of one reproduction.

    Attributes:
      sim: ``python -m tgd_jax.sim`` preset and per-role overrides (role -> flags).
      config: config size of the commands (``demo`` = quarter-width DnCNN, ``""`` = paper).
      seeds: seeds of pretraining and of the key fine-tuning comparison.
      train_steps / finetune_steps / online_steps: training lengths (0 = the config's epochs).
      eval_every: validation intervals of pretraining, fine-tuning and online learning (the
        best checkpoint is chosen from these; pretraining's plateau is read from them).
      train_flags: further config flags of pretraining (e.g. its learning-rate schedule).
      l2sp_strengths: candidate strengths of the L2-SP baseline, chosen on the fine-tuning
        studies (:mod:`tgd_jax.pet.l2sp`); () runs no L2-SP.
      threshold_studies: held-out studies of the threshold study.
      note: what was shrunk and why (goes into the report).
    """

    sim: str
    roles: Mapping[str, tuple[str, ...]]
    config: str
    seeds: tuple[int, ...]
    train_steps: int
    finetune_steps: int
    online_steps: int
    eval_every: tuple[int, int, int]  # train, finetune, online
    note: str
    threshold_studies: int = 1
    train_flags: tuple[str, ...] = ()
    l2sp_strengths: tuple[float, ...] = ()
    workers: int = 0  # jobs at a time (0: reproduce.py's default for the machine)


#: The scales of a reproduction (``reproduce.py --preset``).
PRESETS: dict[str, Preset] = {
    "demo": Preset(
        sim="demo", roles={
            "train": ("--studies=6", "--slices=8"),
            "finetune": ("--studies=2", "--slices=8"),
            "test": ("--studies=2", "--slices=8", "--realisations=6"),
            "online": ("--slices=8",)},
        config="demo", seeds=(0,), train_steps=800, finetune_steps=200, online_steps=100,
        eval_every=(400, 50, 50),
        note="Every stage of the paper, shrunk to run in minutes on 2 CPU cores: a "
             "quarter-width DnCNN, 5 training studies of 8 slices (+1 held out), 2 "
             "fine-tuning studies, 800 pretraining steps, 200 fine-tuning steps, 1 seed. Its "
             "numbers show that the pipeline works, not what the method does."),
    "study": Preset(
        sim="demo", roles={
            "train": ("--studies=13", "--slices=16"),
            "finetune": ("--studies=4", "--slices=16"),
            "test": ("--studies=2", "--slices=16", "--realisations=10"),
            "online": ("--slices=16",)},
        config="demo", seeds=(0, 1, 2), train_steps=4000, finetune_steps=500,
        online_steps=300, eval_every=(500, 50, 100),
        # A cosine over 3,000 steps, then 1,000 at 1 % of the peak rate: the held tail is
        # the last quarter, over which the plateau criterion reads convergence (docs/denoiser.md).
        train_flags=("--config.optimizer.decay_fraction=0.75",
                     "--config.optimizer.final_lr_fraction=0.01"),
        l2sp_strengths=(0.001, 0.01, 0.1, 1.0, 10.0),
        note="The scale at which the comparison can be read on a 2-core CPU in about two "
             "hours: the paper's study ratio (12 training studies + 1 held out, 4 fine-tuning "
             "studies: a third, as 7 of 20), 16 slices per study instead of the whole body, "
             "a quarter-width DnCNN (83,299 parameters instead of 1.3 M), 4,000 pretraining "
             "steps of 16 patches (a cosine over 3,000, then 1,000 at 1 % of the peak rate, "
             "where the held-out loss has settled; the paper: 500 epochs of 32) and 500 "
             "fine-tuning steps, 3 seeds for the key comparison."),
    "paper": Preset(
        sim="paper", roles={
            "train": ("--studies=21",), "finetune": ("--studies=7",),
            "test": ("--studies=2",), "online": ()},
        config="", seeds=(0, 1, 2), train_steps=0, finetune_steps=0, online_steps=0,
        eval_every=(2000, 500, 200),
        note="The paper's scale: full-width DnCNN, 20 training studies (+1 held out) and 7 "
             "fine-tuning studies of 32 slices, 32 x 32 patches, 500 epochs of pretraining, "
             "150 of online learning. For a GPU."),
    "gpu": Preset(
        sim="paper", roles={
            "train": ("--studies=21", "--slices=16"),
            "finetune": ("--studies=7", "--slices=16"),
            "test": ("--studies=2", "--slices=16", "--realisations=10"),
            "online": ("--slices=16",)},
        config="", seeds=(0, 1), train_steps=10000, finetune_steps=2000,
        online_steps=1000, eval_every=(2500, 250, 250), workers=4,
        note="The paper's network and data scale on one H100-class GPU in about 8 minutes "
             "(sized from the measured 2.8 ms full-width step, benchmarks/RESULTS.md): the "
             "full-width DnCNN (1.3 M parameters), the paper's 20 + 1 training and 7 "
             "fine-tuning studies with 16 slices each instead of 32, 10,000 pretraining "
             "steps of 32 patches (about 1.5 % of the paper's 500 epochs) and 2,000 "
             "fine-tuning steps, 2 seeds, 4 jobs at a time on the one GPU, float32."),
    "tiny": Preset(
        sim="demo", roles={
            # The simulation is most of the tiny run's time: one input level of the six, one
            # training study per BMI class, and the roles in this order so that the
            # fine-tuning set (the training set's shapes) starts once the training set's
            # programs are compiled and loads them from the compilation cache.
            "train": ("--studies=2", "--slices=4", "--levels=30"),
            "test": ("--studies=2", "--slices=5", "--realisations=2"),  # 5: room for 13 mm
            "finetune": ("--studies=1", "--slices=4", "--levels=30"),
            "online": ("--slices=4",)},
        config="tiny", seeds=(0,), train_steps=8, finetune_steps=4, online_steps=4,
        eval_every=(4, 2, 2), note="The test suite's: checks that every stage runs."),
}


def at_tiny_scale(preset: Preset) -> Preset:
    """``preset``'s jobs and seeds at the test suite's sizes: to try a preset's whole graph
    on a CPU in minutes (``reproduce.py --preset=gpu --tiny``)."""
    tiny = PRESETS["tiny"]
    sizes = ("--studies", "--slices", "--levels", "--realisations")
    roles = {role: tuple(f for f in flags if not f.startswith(sizes))
             + tiny.roles.get(role, ()) for role, flags in preset.roles.items()}
    return dataclasses.replace(
        preset, sim=tiny.sim, roles=roles, config=tiny.config, train_steps=tiny.train_steps,
        finetune_steps=tiny.finetune_steps, online_steps=tiny.online_steps,
        eval_every=tiny.eval_every, workers=0, note=f"{preset.note} (at tiny scale)")


@dataclasses.dataclass(frozen=True)
class System:
    """A network of the comparison: which system it is and from which seed."""

    label: str  # e.g. "TGD-net"
    seed: int
    start: str = ""  # the network it starts from ("" = from scratch)
    method: str = ""  # finetune/online method
    kind: str = "train"  # train | finetune | online


@dataclasses.dataclass(frozen=True)
class Job:
    """One command of the reproduction.

    ``name`` is unique and names its log and record; ``argv`` runs with the current
    Python from any folder (commands as modules, paths absolute, the package's configs
    included); ``weight`` is its expected cost (for the ETA).
    """

    name: str
    argv: tuple[str, ...]
    deps: tuple[str, ...] = ()
    weight: float = 1.0
    system: System | None = None


#: Fine-tuning systems: job prefix -> (label, method, extra flags). The first three are the
#: key comparison (every seed); the others run with the first seed.
FINETUNES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ftnet": ("FT-net", "last_k", ()),
    "tgdnet": ("TGD-net", "tgd", ()),
    "random": ("random mask", "random", ()),
    "full": ("full fine-tuning", "full", ()),
    "tgdpaper": ("TGD-net, paper mode", "tgd", ("--config.tgd.mode=paper",)),
    "l1": ("L1 mask", "l1", ()),
}
KEY_FINETUNES = ("ftnet", "tgdnet", "random")
#: The L2-SP baseline (every seed; in the presets with ``l2sp_strengths``): full fine-tuning
#: pulled toward the pretrained kernels, its strength chosen on the fine-tuning studies.
L2SP_LABEL = "L2-SP"

#: Online systems: job name -> (label, starting network job, method, phi).
ONLINES: dict[str, tuple[str, str, str]] = {
    "tgdn2n": ("TGD_N2N-net", "v2net", "tgd"),
    "tgd2n2n": ("TGD^2_N2N-net", "tgdnet", "tgd"),
    "n2nfull": ("N2N, all weights", "v2net", "full"),
}


def plan(preset_name: str, out: str | Path, python: str = sys.executable,
         model: str = "dncnn", tiny: bool = False) -> list[Job]:
    """Every job of ``preset_name`` writing under ``out``, in a valid execution order.

    ``model``: the denoiser every network is (``config.model.name``; fine-tuning and online
    learning take it from their starting checkpoint). ``tiny``: :func:`at_tiny_scale`.
    """
    if preset_name not in PRESETS:
        raise UsageError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose from {MODELS}")
    arch = () if model == "dncnn" else (f"--config.model.name={model}",)
    p = at_tiny_scale(PRESETS[preset_name]) if tiny else PRESETS[preset_name]
    out = Path(out)
    data = out / "data"

    def cfg(command: str) -> str:  # absolute: a configs/ folder of the caller's is not ours
        return f"--config={_CONFIGS / command}.py" + (f":{p.config}" if p.config else "")

    jobs: list[Job] = []
    slices = {role: _flag(flags, "slices") for role, flags in p.roles.items()}

    for role, flags in p.roles.items():
        studies = _flag(flags, "studies") or 1
        jobs.append(Job(f"sim-{role}", (python, "-m", "tgd_jax.sim", f"--preset={p.sim}",
                                        f"--role={role}", f"--out={data}", *flags,
                                        *(("--high_bmi_fraction=0.5",) if role == "test" else ())),
                        weight=_sim_weight(role, studies, slices[role] or 32, flags)))
    jobs.append(Job("sim-report", (python, "-m", "tgd_jax.sim", "--report", f"--out={data}"),
                    deps=tuple(f"sim-{r}" for r in p.roles), weight=5))

    def steps(n: int) -> tuple[str, ...]:
        return (f"--config.num_steps={n}",) if n else ()

    held_out = (f"--config.validation.path={data}/train.h5", "--config.validation.version=v2",
                f"--config.old_task.path={data}/train.h5", "--config.old_task.version=v1")
    # Weights: about the seconds one job takes on one core of the 2-core CPU (measured on
    # the demo preset), so that the ETA is right from the first finished job.
    train_weight = 10 + (p.train_steps or 20000) / 5.5
    for seed in p.seeds:
        for version in ("v1", "v2"):
            name = f"{version}net-s{seed}"
            jobs.append(Job(name, (python, *_module("train"), f"--workdir={out / name}",
                                   cfg("train"), f"--config.data.path={data}/train.h5",
                                   f"--config.data.version={version}", f"--config.seed={seed}",
                                   f"--config.eval_every={p.eval_every[0]}",
                                   *arch, *steps(p.train_steps), *p.train_flags),
                            deps=("sim-train",), weight=train_weight,
                            system=System(f"{version}-net", seed)))
    jobs.append(Job("threshold", (python, *_module("threshold"),
                                  f"--checkpoint={out}/v1net-s{p.seeds[0]}",
                                  f"--data={data}/train.h5", "--version=v1",
                                  f"--studies={p.threshold_studies}",
                                  f"--out={out}/threshold"),
                    deps=(f"v1net-s{p.seeds[0]}",), weight=35))
    ft_weight = 10 + (p.finetune_steps or 3000) / 5
    finetunes = dict(FINETUNES)
    after: dict[str, tuple[str, ...]] = {}
    if p.l2sp_strengths:
        # L2-SP: its strength chosen on the fine-tuning studies alone (the last one held
        # out), from the first seed's v1-net; then every seed with the chosen strength
        select = out / "l2sp-select"
        first = f"v1net-s{p.seeds[0]}"
        for strength in p.l2sp_strengths:
            jobs.append(Job(f"l2sp-select-{strength:g}", (
                python, *_module("finetune"), f"--workdir={select / f'{strength:g}'}",
                cfg("finetune"), f"--config.data.path={data}/finetune.h5",
                f"--checkpoint={out / first}", "--method=full",
                f"--config.seed={p.seeds[0]}", f"--config.eval_every={p.eval_every[1]}",
                "--config.data.val_studies=1", f"--config.optimizer.l2_sp={strength:g}",
                *steps(p.finetune_steps)), deps=("sim-finetune", first), weight=ft_weight))
        jobs.append(Job("l2sp-strength", (python, "-m", "tgd_jax.pet.l2sp",
                                          f"--folder={select}"),
                        deps=tuple(f"l2sp-select-{s:g}" for s in p.l2sp_strengths), weight=2))
        finetunes["l2sp"] = (L2SP_LABEL, "full", (f"--flagfile={select}/strength.flags",))
        after["l2sp"] = ("l2sp-strength",)
    for prefix, (label, method, extra) in finetunes.items():
        for seed in p.seeds if prefix in KEY_FINETUNES + ("l2sp",) else p.seeds[:1]:
            name = f"{prefix}-s{seed}"
            start = f"v1net-s{seed}"
            jobs.append(Job(name, (python, *_module("finetune"), f"--workdir={out / name}",
                                   cfg("finetune"), f"--config.data.path={data}/finetune.h5",
                                   f"--checkpoint={out / start}", f"--method={method}",
                                   f"--config.seed={seed}",
                                   f"--config.eval_every={p.eval_every[1]}",
                                   *held_out, *steps(p.finetune_steps), *extra),
                            deps=("sim-finetune", "sim-train", start, *after.get(prefix, ())),
                            weight=ft_weight,
                            system=System(label, seed, start, method, "finetune")))
    seed = p.seeds[0]
    for name, (label, start_prefix, method) in ONLINES.items():
        start = f"{start_prefix}-s{seed}"
        jobs.append(Job(name, (python, *_module("online"), f"--workdir={out / name}", cfg("online"),
                               f"--config.data.path={data}/online.h5",
                               f"--checkpoint={out / start}", f"--method={method}",
                               f"--config.seed={seed}",
                               f"--config.eval_every={p.eval_every[2]}",
                               *steps(p.online_steps)),
                        deps=("sim-online", start), weight=10 + (p.online_steps or 2000) / 5,
                        system=System(label, seed, start, method, "online")))
    networks = [j for j in jobs if j.system is not None]
    eval_size = ((_flag(p.roles["test"], "studies") or 2) * (slices["test"] or 32)
                 * (_flag(p.roles["test"], "realisations") or 10))
    # One evaluation process per seed and version, of every network of that seed: the
    # test set is read and the Gaussian curves are computed once, not once per network.
    # New task (v2) for every network; the old task (v1) for v1-net and its fine-tunings.
    for seed in p.seeds:
        for version in ("v2", "v1"):
            nets = [j for j in networks if j.system.seed == seed and (
                version == "v2" or (j.system.label != "v2-net" and j.system.kind != "online"))]
            if not nets:
                continue
            # --overwrite: the folder is this job's own (a killed run's is redone)
            jobs.append(Job(f"eval-s{seed}-{version}", (
                python, *_module("evaluate"), f"--test={data}/test.h5",
                f"--out={out}/eval/s{seed}-{version}", "--overwrite", f"--version={version}",
                *(f"--net={j.name}={out / j.name}" for j in nets)),
                deps=("sim-test", *(j.name for j in nets)),
                weight=5 + len(nets) * eval_size / 20))
    return jobs


def _sim_weight(role: str, studies: int, slices: int, flags: Sequence[str]) -> float:
    """About the simulator's seconds: one per slice and version (the test role also
    reconstructs each realisation)."""
    versions = 1 if role in ("finetune", "online") else 2
    realisations = (_flag(flags, "realisations") or 10) if role == "test" else 0
    return 10 + studies * slices * versions * (1 + 0.25 * realisations)


def _flag(flags: Sequence[str], name: str) -> int | None:
    for f in flags:
        if f.startswith(f"--{name}="):
            return int(f.split("=", 1)[1])
    return None


def _read_record(path: Path) -> dict[str, Any]:
    """A job record (``jobs/<name>.json``); a damaged one is named, with what to do."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        record = error
    if not isinstance(record, dict) or not isinstance(record.get("argv"), list):
        raise UsageError(f"{path}: not a job record (damaged or edited); delete it and the "
                         "job runs again")
    return record


def _record_path(out: Path, job: Job) -> Path:
    return out / "jobs" / f"{job.name}.json"


def done(out: Path, job: Job) -> bool:
    """True when ``job`` succeeded before with the same command line.

    Raises:
      UsageError: when its record holds ANOTHER command line (the preset or the code
        changed): its outputs belong to that command, so they are not silently reused.
    """
    path = _record_path(out, job)
    if not path.exists():
        return False
    record = _read_record(path)
    if _canonical(record["argv"]) != _canonical(job.argv):  # the interpreter may change
        raise UsageError(
            f"job {job.name!r} in {out} was made by another command:\n  "
            f"{shlex.join(record.get('argv')[1:])}\nnow:\n  {shlex.join(job.argv[1:])}\n"
            f"remove {path} and that job's outputs, or use another --out")
    return True


Log = Callable[[str], None]


def run(jobs: Sequence[Job], out: str | Path, *, workers: int = 1, log: Log = print,
        heartbeat_s: float = 60.0, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Runs the jobs not yet done, ``workers`` at a time, in dependency order.

    Each job's output goes to ``<out>/logs/<job>.log``; on success ``<out>/jobs/<job>.json``
    records its command line and wall time. The first failure stops new jobs from starting
    (running ones finish) and raises :class:`RunError` naming the job and its log. An
    exception here (an interruption: Ctrl-C, SIGTERM) sends SIGTERM to the running jobs and
    waits for them, which stop between checkpoints and resume on the rerun.

    Returns ``{job name: record}`` for every job (skipped ones included).
    """
    out = Path(out)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise UsageError("job names must be unique")
    by_name = {j.name: j for j in jobs}
    for job in jobs:
        unknown = [d for d in job.deps if d not in by_name]
        if unknown:
            raise UsageError(f"job {job.name!r} depends on unknown job(s) {unknown}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    records = {j.name: _read_record(_record_path(out, j)) for j in jobs if done(out, j)}
    _refuse_stale(jobs, records, out)
    todo = [j for j in jobs if j.name not in records]
    total_weight = sum(j.weight for j in todo) or 1.0
    log(f"reproduce: {len(jobs)} jobs, {len(records)} already done, {len(todo)} to run, "
        f"{workers} at a time")
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    # One device per job (unless $TGD_CPU_DEVICES says otherwise): the jobs running side
    # by side fill the cores without all-reduces, and the numbers of a report do not depend
    # on how many ran at a time.
    child_env.setdefault("TGD_CPU_DEVICES", "1")  # tgd_jax.train.parallel.CPU_DEVICES_ENV
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    failed: list[str] = []
    t0 = last_beat = time.monotonic()
    done_weight = done_wall = 0.0
    try:
        while todo or running:
            # Start what can start.
            while not failed and len(running) < workers:
                ready = [j for j in todo if all(d in records for d in j.deps)]
                if not ready:
                    break
                job = ready[0]
                todo.remove(job)
                handle = open(out / "logs" / f"{job.name}.log", "a")  # noqa: SIM115 (closed below)
                handle.write(f"$ {shlex.join(job.argv)}\n")
                handle.flush()
                proc = subprocess.Popen(job.argv, stdout=handle, stderr=subprocess.STDOUT,
                                        env=child_env)
                running[job.name] = (proc, time.monotonic(), handle)
                log(f"  start {job.name}")
            if not running:
                if todo and not failed:
                    blocked = ", ".join(j.name for j in todo)
                    raise RunError(f"reproduce: jobs {blocked} wait for jobs that did not succeed")
                break
            time.sleep(0.2)
            for name, (proc, started, handle) in list(running.items()):
                cpu = _reap(proc)
                if cpu is None:
                    continue
                handle.close()
                del running[name]
                wall = time.monotonic() - started
                job = by_name[name]
                if proc.returncode != 0:
                    failed.append(name)
                    log(f"  FAILED {name} (exit {proc.returncode}) after {wall:.0f} s: see "
                        f"{out / 'logs' / (name + '.log')}")
                    continue
                record = {"argv": list(job.argv), "wall_s": wall, "cpu_s": cpu,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "weight": job.weight}
                workdir_lib.write_json(_record_path(out, job), record)
                records[name] = record
                done_weight += job.weight
                done_wall += wall
                # Seconds per unit of weight, from the jobs finished in this invocation; the
                # remaining weight (running jobs counted whole) is shared by the workers.
                eta = done_wall / done_weight * (total_weight - done_weight) / workers
                log(f"  done  {name} in {_hms(wall)} | {len(records)}/{len(jobs)} jobs, "
                    f"{_hms(time.monotonic() - t0)} elapsed, ETA {_hms(eta)}")
            if running and time.monotonic() - last_beat > heartbeat_s:
                last_beat = time.monotonic()
                for name in running:
                    log(f"  ... {name}: {_last_line(out / 'logs' / f'{name}.log')}")
    except BaseException:  # an error, Ctrl-C or SIGTERM: stop the jobs, which end
        # cleanly on SIGTERM (their checkpoints complete), before the folder is released
        _stop(running)
        raise
    if failed:
        tail = _last_line(out / "logs" / f"{failed[0]}.log")
        raise RunError(f"reproduce: job {failed[0]!r} failed ({tail}); its log: "
                       f"{out / 'logs' / (failed[0] + '.log')}. Rerun the same command to "
                       "resume: finished jobs are skipped")
    return records


def _reap(proc: subprocess.Popen) -> float | None:
    """None while ``proc`` runs; once it ended, sets its return code and returns the CPU
    seconds (user + system) it and the processes it waited for used: the job's cost
    whatever else shares the machine, unlike its wall time. Only this function may reap
    the job's process (a ``proc.poll()`` first would lose its resource usage)."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _stop(running: Mapping[str, tuple[subprocess.Popen, float, Any]],
          grace_s: float = 120.0) -> None:
    """SIGTERM to every running job, then waits for them (SIGKILL after ``grace_s``)."""
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.terminate()
    for proc, _, handle in running.values():
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        handle.close()


def _refuse_stale(jobs: Sequence[Job], records: Mapping[str, Any], out: Path) -> None:
    """A finished job whose input job must run again, or ran after it, was made from other
    inputs: its outputs would be reused silently (a command resumes a finished workdir as
    done), so the run stops and names them."""
    stale = [j.name for j in jobs if j.name in records and any(
        d not in records or records[d]["finished"] > records[j.name]["finished"]
        for d in j.deps)]
    if stale:
        raise UsageError(
            f"{len(stale)} finished job(s) in {out} depend on jobs that are missing or newer, "
            f"so their outputs are out of date: {', '.join(stale[:8])}"
            + (" ..." if len(stale) > 8 else "") + ". Remove their records "
            f"({out / 'jobs'}/<job>.json) and outputs, then rerun")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
