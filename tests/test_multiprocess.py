"""Several processes on one machine, as on a pod: 2 processes of 1 CPU device each, joined
by ``--coordinator_address/--num_processes/--process_id`` and talking through gloo.

Each run is real: every process is a command line of its own (``train.py`` ...), and the
references are the same commands in one process with 2 devices (the same global mesh).
Tiny configs; docs/suite.md has what the file costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import pinned, quiet

from tgd_jax.io.errors import RunError, UsageError
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import data as data_lib
from tgd_jax.pet import evaluate as evaluate_lib
from tgd_jax.pet import pipeline
from tgd_jax.train import checkpoints, parallel
from tgd_jax.train.tensorboard import read_events

pytestmark = pytest.mark.slow  # most tests here start processes that join as one run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV.pop("XLA_FLAGS", None)  # each process has the devices its flags say
# A killed process is noticed at once in a collective, and after this in a barrier.
ENV["TGD_HEARTBEAT_TIMEOUT_S"] = "10"
#: One training config for every run of this file: checkpoints every 10 steps, so a kill
#: lands between two of them.
STEPS = 30


def _tiny(kind: str, data: Path, *more: str) -> list[str]:
    return [f"--config={ROOT}/configs/{kind}.py:tiny", f"--config.data.path={data}", *more]


def _train_args(toy_data) -> list[str]:
    return ["train.py", *_tiny("train", toy_data["train"], f"--config.num_steps={STEPS}",
                               "--config.eval_every=10", "--config.log_every=10")]


class Launch:
    """``n`` processes of one command (n=1: a plain run, no launch flags).

    ``port``: the coordinator's (default: a free one). When another program holds it by the
    time process 0 starts (:func:`parallel.free_port` can race), process 0 says so at once
    and every process is started again on a new port.
    """

    #: What process 0 says when its coordinator port is taken.
    PORT_TAKEN = "is in use on this machine, where process 0 serves the coordinator"

    def __init__(self, argv: list[str], n: int, logs: Path, name: str,
                 env: dict[str, str] | None = None, cores: set[int] | None = None,
                 port: int | None = None):
        self.argv, self.n, self.env, self.cores = argv, n, env, cores
        self.logs = [logs / f"{name}.{i}.log" for i in range(n)]
        self.ports: list[int] = []  # every port tried, in order
        self._start(port or parallel.free_port())

    def _start(self, port: int) -> None:
        self.ports.append(port)
        launch = (lambda i: [f"--coordinator_address=localhost:{port}",
                             f"--num_processes={self.n}", f"--process_id={i}"]
                  ) if self.n > 1 else (lambda i: [])
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out, pinned(self.cores):
                self.procs.append(subprocess.Popen(
                    [sys.executable, *self.argv, *launch(i)], stdout=out,
                    stderr=subprocess.STDOUT, env=ENV if self.env is None else self.env,
                    cwd=ROOT))

    def _restarted(self) -> bool:
        """Starts every process again on a new port if process 0 found its port taken."""
        if self.n == 1 or self.procs[0].poll() is None or len(self.ports) > 3 or (
                self.PORT_TAKEN not in self.logs[0].read_text()):
            return False
        self._kill()
        self._start(parallel.free_port())
        return True

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever happened in the block (a failed assert, a timeout), no process outlives
        the test."""
        self._kill()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def wait(self, timeout: float = 300, check: bool = True) -> list[str]:
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and (self._restarted() or any(
                    p.poll() is None for p in self.procs)):
                time.sleep(0.05)
        finally:
            self._kill()
        outs = [log.read_text() for log in self.logs]
        if check and any(p.returncode for p in self.procs):
            raise AssertionError("\n\n".join(f"process {i} exited {p.returncode}:\n{o[-3000:]}"
                                             for i, (p, o) in
                                             enumerate(zip(self.procs, outs, strict=True))))
        return outs

    def kill_at_checkpoint(self, workdir: Path, which: int, step: int = 10) -> None:
        """SIGKILLs process ``which`` once checkpoint ``step`` is complete, mid-run."""
        done = workdir / "checkpoints" / str(step)  # orbax renames it when complete
        deadline = time.time() + 240
        while not done.exists() and time.time() < deadline and (
                self._restarted() or self.procs[which].poll() is None):
            time.sleep(0.02)
        assert done.exists(), self.logs[which].read_text()[-2000:]
        self.procs[which].send_signal(signal.SIGKILL)


def _leaves(workdir: Path) -> list[np.ndarray]:
    params, stats, _, _ = checkpoints.restore(workdir, "latest")
    return [np.asarray(x) for x in jax.tree.leaves((params, stats))]


def _assert_close_params(a: Path, b: Path) -> None:
    """Parameters and statistics equal within float32 reduction order (the tolerance of
    tests/test_cli.py's 1 vs 4 devices)."""
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-3)) < 1e-5


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in _records(workdir) for k in sorted(r)
            if k == "loss" or k.startswith("val_loss")]


def _assert_same_losses(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    np.testing.assert_allclose([x[2] for x in la], [x[2] for x in lb], rtol=1e-5)


# --- the rows each process makes ---------------------------------------------------------


def _golden_pairs() -> data_lib.PairSet:
    volumes = tuple(np.arange(6 * 20 * 20, dtype=np.float32).reshape(6, 20, 20) * (k + 1)
                    for k in range(3))
    return data_lib.PairSet(volumes, np.array([[0, 1], [2, 1], [1, 0]]), ("a", "b", "c"))


@pytest.mark.parametrize("augment, stream, digest", [
    (True, data_lib.STREAM_TRAIN,
     "0c055042a7fe987c8beac1934cdeb7a2a32ffd63ebb855d623262cb3e135c576"),
    (False, data_lib.STREAM_VAL,
     "8ae79a7962036bf6d24006a3d7fca713bd80ff0aa36635f468c72342ea181b6e"),
])
def test_one_process_draws_the_batches_it_always_drew(augment, stream, digest):
    # The digests are of the batches before several processes existed (sample_batch of the
    # previous release): a single-process run stays bit-identical.
    batch = data_lib.sample_batch(_golden_pairs(), seed=3, step=7, batch_size=8, patch_size=16,
                                  augment=augment, stream=stream)
    got = hashlib.sha256(batch["inputs"].tobytes() + batch["targets"].tobytes()).hexdigest()
    assert got == digest


@pytest.mark.parametrize("cuts", [(0, 4, 8), (0, 2, 4, 8), (0, 1, 2, 3, 4, 5, 6, 7, 8)])
def test_the_rows_of_the_processes_make_the_whole_batch(cuts):
    pairs = _golden_pairs()
    whole = data_lib.sample_batch(pairs, seed=1, step=2, batch_size=8, patch_size=8)
    parts = [data_lib.sample_batch(pairs, seed=1, step=2, batch_size=8, patch_size=8,
                                   rows=slice(a, b))
             for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    for name in whole:
        assert np.concatenate([p[name] for p in parts]).tobytes() == whole[name].tobytes()


ROWS = textwrap.dedent("""
    import sys
    import numpy as np
    from tgd_jax.pet import data as data_lib
    from tgd_jax.train import parallel
    address, index, path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    parallel.init_distributed(address, 2, index)
    from jax.experimental import multihost_utils
    mesh = parallel.make_mesh()
    pairs = data_lib.supervised_pairs(path, "v1")
    rows = parallel.process_rows(8, mesh)
    local = data_lib.sample_batch(pairs, seed=0, step=5, batch_size=8, patch_size=16, rows=rows)
    batch = parallel.shard_batch(local, mesh)
    whole = multihost_utils.process_allgather(batch["inputs"], tiled=True)
    np.savez(f"{out}/p{index}.npz", rows=[rows.start, rows.stop], local=local["inputs"],
             whole=whole)
""")


def test_each_process_makes_only_its_rows_of_the_global_batch(toy_data, tmp_path):
    port = parallel.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", ROWS, f"localhost:{port}", str(i),
                               str(toy_data["train"]), str(tmp_path)], env=ENV, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
    finally:  # no process outlives the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    full = data_lib.sample_batch(data_lib.supervised_pairs(toy_data["train"], "v1"), seed=0,
                                 step=5, batch_size=8, patch_size=16)["inputs"]
    made = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    assert [list(m["rows"]) for m in made] == [[0, 4], [4, 8]]
    # each example made once, by one process: together exactly the one-process batch
    assert np.concatenate([m["local"] for m in made]).tobytes() == full.tobytes()
    for m in made:  # and the global array the step sees is that batch
        assert m["whole"].tobytes() == full.tobytes()


# --- train.py ----------------------------------------------------------------------------


#: Two of this machine's cores, for the run with the default device count (every core).
TWO_CORES = set(sorted(os.sched_getaffinity(0))[:2])


#: The commands' environment without $TGD_CPU_DEVICES: each picks its default device count.
DEFAULT_ENV = {k: v for k, v in ENV.items() if k != parallel.CPU_DEVICES_ENV}


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    """The same training run with the default device counts: 2 processes (1 device each),
    and 1 process pinned to 2 cores (one device per core)."""
    root = tmp_path_factory.mktemp("runs")
    args = _train_args(toy_data)
    two = Launch([*args, f"--workdir={root / 'two'}"], 2, root, "two", env=DEFAULT_ENV).wait()
    (root / "two_args.json").write_text(json.dumps([*args, f"--workdir={root / 'two'}"]))
    few = [] if len(TWO_CORES) == 2 else ["--cpu_devices=2"]  # a 1-core machine
    one = Launch([*args, f"--workdir={root / 'one'}", *few], 1, root, "one", env=DEFAULT_ENV,
                 cores=TWO_CORES).wait()
    return {"root": root, "two": root / "two", "one": root / "one", "logs": two + one}


def test_two_processes_train_as_one_process_with_two_devices(runs):
    _assert_same_losses(runs["two"], runs["one"])
    _assert_close_params(runs["two"], runs["one"])
    # By default a single process splits its 2 cores into 2 devices, and each of several
    # processes keeps 1.
    for name in ("two", "one"):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert summary["devices"] == 2 and summary["global_batch"] == 4
        assert summary["steps"] == STEPS


def test_process_zero_alone_writes_and_the_checkpoint_is_one(runs):
    first, second = runs["logs"][:2]
    assert "train.py finished" in first and f"step {STEPS}/{STEPS}" in first
    assert "step " not in second and "finished" not in second  # no progress lines
    workdir = runs["two"]
    steps = [r["step"] for r in _records(workdir) if "loss" in r]
    assert steps == list(range(10, STEPS + 1, 10))  # every record once
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    # one checkpoint per step (orbax's multi-process save), the last 3 kept, nothing
    # unfinished; it loads in this single-device process
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
        str(step) for step in range(STEPS - 20, STEPS + 1, 10)]
    assert [p.name for p in (workdir / "best").iterdir()] == [
        str(json.loads((workdir / "summary.json").read_text())["best_step"])]
    assert len(_leaves(workdir)) == len(_leaves(runs["one"]))


def _resumed_at(log: str, workdir: Path) -> int:
    said = f"resuming from {workdir / 'checkpoints'} at step "
    assert said in log, log[-2000:]
    return int(log.split(said)[1].split()[0].rstrip(".,;"))


def test_a_killed_process_ends_the_other_and_the_run_resumes_on_other_process_counts(
        runs, toy_data, tmp_path):
    """2 processes, one SIGKILLed after a checkpoint: the other stops at once with one line.
    The run resumes as 1 process of 2 devices, is killed after its next checkpoint, and
    ends as 2 processes again: the same run as the uninterrupted one."""
    workdir = tmp_path / "moved"
    args = [*_train_args(toy_data), f"--workdir={workdir}"]
    with Launch(args, 2, tmp_path, "killed") as run:
        run.kill_at_checkpoint(workdir, which=1)
        t0 = time.time()
        survivor = run.procs[0]
        survivor.wait(timeout=120)  # bounded: never a hang
        waited = time.time() - t0
        out = run.logs[0].read_text()
    assert survivor.returncode == 1, out[-2000:]
    assert waited < 40, waited  # within the heartbeat timeout (10 s here), and slack
    line = out.strip().splitlines()[-1]
    # stopped in a step's all-reduce, or in a checkpoint's barrier: either way one line
    assert line.startswith("train.py: error: process 0 of 2"), line
    assert "if another process of this run stopped, that is the cause" in line
    assert "Rerun every process to resume" in line
    # 2 processes -> 1 process with 2 devices, killed once its next checkpoint is complete
    with Launch([*args, "--cpu_devices=2"], 1, tmp_path, "single") as run:
        # the resume line comes before any step: wait for it, then for the next checkpoint
        deadline = time.time() + 120
        while ("resuming from" not in run.logs[0].read_text() and time.time() < deadline
               and run.procs[0].poll() is None):
            time.sleep(0.05)
        single_from = _resumed_at(run.logs[0].read_text(), workdir)
        assert 10 <= single_from < STEPS - 10
        run.kill_at_checkpoint(workdir, which=0, step=single_from + 10)
        run.wait(check=False)
    # 1 process -> 2 processes, to the end
    first = Launch(args, 2, tmp_path, "grown").wait()[0]
    assert single_from < _resumed_at(first, workdir) < STEPS  # the rest ran on 2 processes
    _assert_close_params(workdir, runs["one"])
    _assert_same_losses(workdir, runs["one"])


#: ``python -c INJECT <fault> <script> <args>``: runs the script with a fault in process 1
#: only (what one process of a real run may meet alone).
INJECT = textwrap.dedent("""
    import runpy, sys
    import jax
    from tgd_jax.train import checkpoints, metrics
    fault, script = sys.argv[1], sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    one = lambda: jax.process_index() == 1

    if fault == "bug":  # a genuine bug of this process, mid-run
        train = metrics.MetricsLogger.train
        def buggy(self, step, *args, **kwargs):
            if one() and step >= 20:
                raise TypeError("injected bug in process 1")
            return train(self, step, *args, **kwargs)
        metrics.MetricsLogger.train = buggy

    if fault == "stale":  # process 1 reads the newest checkpoint as damaged, no metrics
        peek, read_metrics = checkpoints.peek_metadata, metrics.read_metrics
        def damaged(manager, step, folder):
            if one() and step == 30 and folder.parent.name == "checkpoints":
                raise checkpoints.CorruptCheckpointError(f"{folder}: injected, unreadable")
            return peek(manager, step, folder)
        def stale(path, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if one() and caller in ("reconcile_best", "_best_to_rebuild"):
                return []
            return read_metrics(path, *args, **kwargs)
        checkpoints.peek_metadata, metrics.read_metrics = damaged, stale

    runpy.run_path(script, run_name="__main__")
""")


def test_a_bug_in_one_process_keeps_its_traceback(toy_data, tmp_path):
    """A TypeError in process 1 is its own fault (traceback, 'internal error'), not
    'another process stopped'; process 0, whose peer is gone, says that one. The first
    port tried is taken: process 0 says so at once and the launch moves on."""
    workdir = tmp_path / "bug"
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        run = Launch(["-c", INJECT, "bug", *_train_args(toy_data), f"--workdir={workdir}"],
                     2, tmp_path, "bug", port=taken.getsockname()[1])
        first, second = run.wait(timeout=240, check=False)
    assert len(run.ports) >= 2 and run.ports[0] != run.ports[-1]
    assert [p.returncode for p in run.procs] == [1, 1], (first[-2000:], second[-2000:])
    assert "Traceback" in second and "TypeError: injected bug in process 1" in second
    assert "internal error" in second and "another process" not in second
    assert "if another process of this run stopped, that is the cause" in first
    assert "Traceback" not in first  # the peer's stop is one line
    assert (workdir / "checkpoints" / "10").is_dir()  # what was written stays


def test_processes_act_on_what_process_0_sees(runs, tmp_path):
    """Process 1 reads the newest checkpoint as damaged and sees no metrics (a stale
    network-file-system cache, say), while process 0 reads both fine: every process sets
    the checkpoint aside and resumes from the same step, and best/ (removed) is rebuilt as
    process 0 decides. Before: process 0 resumed from 30 and process 1 from 20."""
    workdir = tmp_path / "stale"
    shutil.copytree(runs["two"], workdir)
    shutil.rmtree(workdir / "best")
    args = [a.replace(str(runs["two"]), str(workdir)) for a in json.loads(
        (runs["root"] / "two_args.json").read_text())]
    first, _ = Launch(["-c", INJECT, "stale", *args], 2, tmp_path, "stale",
                      env=DEFAULT_ENV).wait(timeout=240)
    assert "unreadable by process 1 of 2" in first
    assert (workdir / "damaged" / "checkpoints-30").is_dir()
    assert f"resuming from {workdir / 'checkpoints'} at step 20" in first
    assert f"rebuilt {workdir / 'best'}" in first
    summary = json.loads((workdir / "summary.json").read_text())
    assert [p.name for p in (workdir / "best").iterdir()] == [str(summary["best_step"])]
    _assert_close_params(workdir, runs["one"])  # the same run as the uninterrupted one
    _assert_same_losses(workdir, runs["one"])


def test_a_taken_coordinator_port_is_one_line_at_once():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} is in use on this machine"):
            parallel.init_distributed(f"localhost:{port}", 2, 0)
    assert not parallel.multi_process()  # refused before joining anything
    # the other processes do not serve the coordinator: nothing to check for them
    parallel.check_coordinator_port(f"localhost:{parallel.free_port()}")


def test_only_a_failing_collective_points_at_another_process(tmp_path):
    from tgd_jax.train.trainer import _process_failure

    bug = TypeError("unsupported operand")
    assert _process_failure(bug, 7, tmp_path) is bug  # kept as it is: its traceback shows
    ours = UsageError("bad")
    assert _process_failure(ours, 7, tmp_path) is ours
    for failure in (jax.errors.JaxRuntimeError("UNAVAILABLE: connection reset"),
                    ConnectionResetError("peer"), TimeoutError("barrier")):
        got = _process_failure(failure, 7, tmp_path)
        assert isinstance(got, RunError)
        assert "stopped at step 7" in str(got) and "if another process" in str(got)


# --- finetune.py (paper mode), online.py (projected mode), evaluate.py ----------------------


# Fine-tuning in paper mode (gates in the model, frozen statistics), online learning in the
# default projected mode: each mode and each command on two processes once.
@pytest.mark.parametrize("kind, data, more", [
    ("finetune", "finetune", ["--method=tgd", "--config.tgd.mode=paper"]),
    ("online", "online", ["--method=tgd", "--config.tgd.mode=projected"]),
])
def test_finetune_and_online_on_two_processes(runs, toy_data, tmp_path, kind, data, more):
    workdir = tmp_path / "two"
    args = [f"{kind}.py", f"--workdir={workdir}", f"--checkpoint={runs['two']}",
            *_tiny(kind, toy_data[data], *more)]
    out = Launch(args, 2, tmp_path, kind).wait()
    assert f"{kind}.py finished" in out[0] and "finished" not in out[1]
    # the same run in this process, on one device
    config = config_lib.override(getattr(config_lib, f"{kind}_config")("tiny"), **{
        "data.path": str(toy_data[data]), "checkpoint": str(runs["two"]), "method": "tgd",
        "tgd.mode": more[-1].split("=")[1]})
    getattr(pipeline, kind)(config, tmp_path / "one", log=quiet)
    assert (json.loads((workdir / "mask.json").read_text())["channels"]
            == json.loads((tmp_path / "one" / "mask.json").read_text())["channels"])
    _assert_same_losses(workdir, tmp_path / "one")
    _assert_close_params(workdir, tmp_path / "one")
    tags = {e["tag"] for e in read_events(workdir)}
    assert {"run/retrained_fraction", "val/slice_input_output_target"} <= tags


def test_evaluate_on_two_processes(runs, toy_data, tmp_path):
    out = tmp_path / "evaluation"
    logs = Launch(["evaluate.py", f"--test={toy_data['test']}", f"--out={out}",
                   f"--net=a={runs['two']}", f"--net=b={runs['one']}"], 2, tmp_path,
                  "evaluate").wait()
    assert "| a |" in logs[0] and "| a |" not in logs[1]
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    expected = evaluate_lib.evaluate(toy_data["test"], {"a": runs["two"], "b": runs["one"]})
    assert [(r["network"], r["study"]) for r in rows] == [
        (r["network"], r["study"]) for r in expected["rows"]]
    for got, want in zip(rows, expected["rows"], strict=True):
        assert got["lesion_bias_pct"] == pytest.approx(want["lesion_bias_pct"], rel=1e-4)
        assert got["liver_cov_pct"] == pytest.approx(want["liver_cov_pct"], rel=1e-4)
