r"""When XLA aborts an in-process CPU all-reduce ("Termination timeout"), and when not.

  python -m benchmarks.rendezvous --trials=3 --seconds=120 [--data=runs/demo/data/train.h5]

Every trial is a fresh process on 2 CPU devices (``--devices``) whose main thread runs a
jitted data-parallel step again and again (a sum over the sharded batch, all-reduced into a
replicated vector: cheap, so the collectives come often) while a second thread works
beside it (or not):

* ``no-thread``: the control: no second thread at all;
* ``no-thread-sync``: no second thread, and each step waits for the one before (one
  collective program in flight instead of up to 50);
* ``numpy-on-thread``: the thread keeps a core busy with NumPy only (random batches),
  touching no device;
* ``put-on-thread``: the thread copies batches to the devices as fast as it can (the step
  uses another one);
* ``get-on-thread``: the thread copies a small replicated array back to the host, likewise;
* ``prefetch-old``: :class:`tgd_jax.train.prefetch.Prefetcher` samples *and copies* each batch
  on its thread, the step consumes it (how the trainer worked before ``place``);
* ``prefetch-new``: the thread samples with NumPy only and the main thread copies
  (``Prefetcher(..., place=...)``, what :func:`tgd_jax.train.trainer.fit` does);
* ``train``: ``train.py`` at the tiny config with its default device count, pinned to
  ``--devices`` cores, a validation and an (asynchronous orbax) checkpoint every 10 steps.

XLA's collective timeouts are shortened (stuck warning 3 s, termination 10 s), so a stuck
collective ends a trial in seconds rather than minutes; a trial that runs ``--steps`` steps
or ``--seconds`` seconds without one counts as clean. The outcome per mode is the number
of trials XLA aborted (SIGABRT, "Termination timeout") and the seconds each took. It
depends on the jaxlib version and on the machine's load (``--load`` adds busy loops):
report both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODES = ("no-thread", "no-thread-sync", "numpy-on-thread", "put-on-thread", "get-on-thread",
         "prefetch-old", "prefetch-new", "train")
_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=3 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=10")


def _trial(mode: str, devices: int, steps: int) -> None:
    """One trial, in this (fresh) process: prints ``clean <steps> <seconds>`` at the end."""
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                               + os.environ.get("XLA_FLAGS", _TIMEOUTS))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tgd_jax.train.prefetch import Prefetcher

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharded, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(
        mesh, PartitionSpec())
    shape = (4 * devices, 32, 32, 8)

    @jax.jit
    def step(w: jax.Array, x: jax.Array) -> jax.Array:  # w: (8,) replicated, x sharded
        return w + 1e-9 * jnp.sum(x ** 2, axis=(0, 1, 2))  # the sum is all-reduced

    put = lambda host: jax.device_put(host, sharded)  # noqa: E731
    probe = jax.device_put(np.ones((64, 64), np.float32), replicated)

    def make(i: int) -> Any:
        host = np.random.default_rng(i).standard_normal(shape, dtype=np.float32)
        return put(host) if mode == "prefetch-old" else host

    stop = threading.Event()

    def traffic() -> None:  # the free-running second thread of the *-on-thread modes
        rng = np.random.default_rng(0)
        while not stop.is_set():
            if mode == "numpy-on-thread":
                rng.standard_normal(shape, dtype=np.float32)
            elif mode == "put-on-thread":
                put(rng.standard_normal(shape, dtype=np.float32))
            else:
                np.asarray(probe)

    w = jax.device_put(np.zeros(8, np.float32), replicated)
    fixed = put(np.ones(shape, np.float32))
    start = time.perf_counter()
    if mode.startswith("prefetch"):
        batches: Any = Prefetcher(make, 0, steps, depth=2,
                                  place=put if mode == "prefetch-new" else None)
    else:
        batches = ((i, fixed) for i in range(steps))
        if not mode.startswith("no-thread"):
            second = threading.Thread(target=traffic, daemon=True)
            second.start()
    every = 1 if mode == "no-thread-sync" else 50
    for i, batch in batches:
        w = step(w, batch)
        if i % every == 0:
            w.block_until_ready()
    w.block_until_ready()
    stop.set()
    if not mode.startswith(("no-thread", "prefetch")):
        second.join()  # a thread still copying at interpreter exit crashes it
    print(f"clean {steps} {time.perf_counter() - start:.1f}", flush=True)


def _command(mode: str, devices: int, steps: int, data: str, workdir: Path) -> list[str]:
    if mode != "train":
        return [sys.executable, "-m", "benchmarks.rendezvous", f"--trial={mode}",
                f"--devices={devices}", f"--steps={steps}"]
    return [sys.executable, "train.py", "--config=configs/train.py:tiny",
            f"--config.data.path={data}", f"--config.num_steps={steps}",
            "--config.eval_every=10", "--config.log_every=10", f"--workdir={workdir}"]


def run(modes: list[str], trials: int, devices: int, steps: int, seconds: float,
        data: str, xla_timeouts: bool = False) -> dict[str, Any]:
    import tempfile

    import jax
    import jaxlib

    out: dict[str, Any] = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                           "cores": len(os.sched_getaffinity(0)), "devices": devices,
                           "steps": steps, "seconds_limit": seconds,
                           "load_average_at_start": os.getloadavg()[0],
                           "xla_timeouts": "XLA's own (20 s, 40 s)" if xla_timeouts else _TIMEOUTS,
                           "modes": {}}
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TGD_CPU_DEVICES")}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
               XLA_FLAGS=" " if xla_timeouts else _TIMEOUTS)
    cores = set(sorted(os.sched_getaffinity(0))[:devices])
    for mode in modes:
        rows = []
        for t in range(trials):
            begin = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="tgd-rendezvous-") as scratch:
                mine = os.sched_getaffinity(0)
                os.sched_setaffinity(0, cores)  # inherited by the trial (no fork hook)
                try:
                    proc = subprocess.Popen(
                        _command(mode, devices, steps, data, Path(scratch) / "run"),
                        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
                finally:
                    os.sched_setaffinity(0, mine)
                try:
                    stdout, stderr = proc.communicate(timeout=seconds)
                    outcome = ("aborted" if "Termination timeout" in stderr + stdout
                               else "clean" if proc.returncode == 0
                               else f"rc {proc.returncode}: {(stderr + stdout)[-300:]}")
                except subprocess.TimeoutExpired:  # its time ran out without a stuck collective
                    proc.send_signal(signal.SIGKILL)
                    stdout, stderr = proc.communicate()
                    outcome = "clean (time limit)"
            done = re.findall(r"step (\d+)/\d+", stdout)  # train.py's progress lines
            rows.append({"outcome": outcome, "seconds": round(time.perf_counter() - begin, 1),
                         **({"steps_done": int(done[-1])} if done else {})})
            print(f"{mode:14s} trial {t}: {outcome} after {rows[-1]['seconds']} s"
                  + (f" ({done[-1]} steps)" if done else ""), flush=True)
        out["modes"][mode] = {"aborted": sum(r["outcome"] == "aborted" for r in rows),
                              "trials": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--data", default="runs/demo/data/train.h5",
                        help="a training dataset for the train mode")
    parser.add_argument("--load", type=int, default=0,
                        help="busy-loop processes (nice 5) to run beside the trials, as a "
                        "machine shared with other runs")
    parser.add_argument("--xla_timeouts", action=argparse.BooleanOptionalAction, default=False,
                        help="keep XLA's own collective timeouts (warning 20 s, termination "
                        "40 s) instead of 3 s and 10 s")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    parser.add_argument("--trial", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        _trial(args.trial, args.devices, args.steps)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown --modes {unknown}; choose from {list(MODES)}")
    busy = [subprocess.Popen(["nice", "-n", "5", sys.executable, "-c", "while True: pass"])
            for _ in range(args.load)]
    try:
        result = run(modes, args.trials, args.devices, args.steps, args.seconds,
                     str(Path(args.data).resolve()), args.xla_timeouts)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    result["busy_loops_beside"] = args.load
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
