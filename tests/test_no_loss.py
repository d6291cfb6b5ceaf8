"""No data loss, round 3: the best checkpoint at every moment of its write, a resume that
rebuilds it, and a torn ``metrics.jsonl`` that does not block a resume."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import quiet, tiny_train_config

from tgd_jax.io.errors import RunError
from tgd_jax.pet import pipeline
from tgd_jax.train import checkpoints


def _bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _best(workdir: Path) -> tuple[int, list[bytes]]:
    restored = checkpoints.restore(workdir, "best")
    return restored.meta["step"], _bytes(restored.params)


def _complete(step_dir: Path) -> bool:
    return (step_dir / "commit_success.txt").exists() or (
        step_dir / "state" / "commit_success.txt").exists()


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory):
    """An uninterrupted tiny run: 12 steps, validated and checkpointed every 4."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    return workdir, summary


def test_there_is_always_a_complete_best_while_a_new_one_is_written(tmp_path):
    from test_checkpoints import _state

    state, _ = _state()
    ckpt = checkpoints.Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state, {}, val_loss=10.0)
    ckpt.wait()
    seen: list[list[str] | None] = []  # per listing: its complete bests (None: unknown)
    stop = threading.Event()

    was_complete: set[str] = set()

    def watch() -> None:  # what a kill at the moment of each listing would leave
        while not stop.is_set():
            try:
                names = [p.name for p in (tmp_path / "best").iterdir()]
            except OSError:  # listed while renamed: look again
                continue
            complete: list[str] | None = []
            for n in filter(str.isdigit, names):
                step_dir = tmp_path / "best" / n
                if _complete(step_dir):
                    was_complete.add(n)
                    complete.append(n)
                elif not step_dir.exists():
                    if n in was_complete:
                        # removed since the listing: it was complete then (a step folder is
                        # complete from its commit file until it is removed), so the
                        # listing's moment had a complete best; the removal is judged at the
                        # next listing
                        complete.append(n)
                    elif not complete:
                        # written and removed between the listing and this look (a loaded
                        # machine starves this thread): its state at the listing is unknown
                        complete = None
                        break
            seen.append(complete)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(2, 26):  # every save a new best
            ckpt.save(step, state, {}, val_loss=10.0 - step * 0.1)
    finally:
        stop.set()
        watcher.join()
    ckpt.close()
    known = [c for c in seen if c is not None]
    assert len(known) > 20, (len(known), len(seen))  # it looked often (less often when loaded)
    assert all(known), "a moment with no complete best/"
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["25"]


@pytest.mark.parametrize("moment", ["best-removed", "best-unfinished", "best-older"])
def test_a_resume_rebuilds_a_lost_or_stale_best(toy_data, reference, tmp_path, moment):
    ref_dir, ref_summary = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    best = workdir / "best"
    (step_dir,) = best.iterdir()
    if moment == "best-removed":  # killed between removing the old best and the new one
        shutil.rmtree(best)
    elif moment == "best-unfinished":  # the only best still in orbax's temporary folder
        step_dir.rename(best / f"{step_dir.name}.orbax-checkpoint-tmp-1234")
    else:  # best/ holds an earlier step than the best recorded (a write that never landed)
        shutil.rmtree(step_dir)
        shutil.copytree(workdir / "checkpoints" / "4", best / "4")
        assert ref_summary["best_step"] != 4  # else this moment tests nothing
    lines: list[str] = []
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=lines.append)
    assert summary["best_step"] == ref_summary["best_step"]
    assert summary["best_val_loss"] == ref_summary["best_val_loss"]
    assert _best(workdir) == _best(ref_dir)  # the same network, bit for bit
    assert sum("rebuilt" in line and "best" in line for line in lines) == 1
    assert sorted(p.name for p in best.iterdir()) == [str(ref_summary["best_step"])]


def test_a_best_no_checkpoint_can_rebuild_is_said_in_one_line(toy_data, tmp_path):
    config = tiny_train_config(toy_data["train"], keep_checkpoints=1)
    workdir = tmp_path / "run"
    summary = pipeline.train(config, workdir, log=quiet)
    if summary["best_step"] == 12:
        pytest.skip("the best is the last step: still kept")
    shutil.rmtree(workdir / "best")
    lines: list[str] = []
    pipeline.train(config, workdir, log=lines.append)
    said = [line for line in lines if "cannot be rebuilt" in line]
    assert len(said) == 1 and f"step {summary['best_step']}" in said[0]


def test_a_killed_run_whose_best_was_unfinished_gets_the_same_best(toy_data, reference,
                                                                   tmp_path):
    """The issue's case: killed after checkpoints/8 (the best step) is complete while
    best/ holds no complete step; the rerun's best is the uninterrupted run's, not the
    next validation after the resume."""
    _, ref_summary = reference
    assert ref_summary["best_step"] == 8  # else this case tests nothing
    workdir = tmp_path / "run"

    class Killed(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith("step 10/12"):
            deadline = time.time() + 60
            while not (_complete(workdir / "checkpoints" / "8")
                       and _complete(workdir / "best" / "8")):
                assert time.time() < deadline, "the step-8 checkpoints never completed"
                time.sleep(0.01)
            for step_dir in (workdir / "best").iterdir():  # as if its write never finished
                step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-9"))
            raise Killed

    with pytest.raises(Killed):
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=log)
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert (summary["best_step"], summary["best_val_loss"]) == (
        ref_summary["best_step"], ref_summary["best_val_loss"])


def test_a_full_disk_while_writing_the_best_is_reported_at_that_step(toy_data, reference,
                                                                    tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    real = handler.JsonCheckpointHandler._save_fn

    async def failing(self, item, directory):
        if "best" in str(directory) and item.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, item, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", failing)
    workdir = tmp_path / "run"
    with pytest.raises(RunError, match="at step 4") as caught:
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert "No space left on device" in str(caught.value)
    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", real)
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    _, ref_summary = reference
    assert (summary["best_step"], summary["best_val_loss"]) == (
        ref_summary["best_step"], ref_summary["best_val_loss"])


@pytest.mark.parametrize("tail", [b'{"step": 12, "loss": 0.0', b"\x00" * 300,
                                  b'{"step": 8, "val_lo\x00\x00\x00\x00'])
def test_a_torn_metrics_tail_is_dropped_and_the_run_resumes(toy_data, reference, tmp_path,
                                                            tail):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")  # resume from 8: steps 9-12 run again
    metrics = workdir / "metrics.jsonl"
    intact = [line for line in metrics.read_text().splitlines()
              if json.loads(line)["step"] <= 8]
    metrics.write_bytes(("\n".join(intact) + "\n").encode() + tail)
    lines: list[str] = []
    pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=lines.append)
    torn = [line for line in lines if "torn last line" in line]
    assert len(torn) == 1 and str(metrics) in torn[0]
    assert _bytes(checkpoints.restore(workdir, "latest").params) == _bytes(
        checkpoints.restore(ref_dir, "latest").params)

    def losses(path: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in
                map(json.loads, path.read_text().splitlines())]

    assert losses(metrics) == losses(ref_dir / "metrics.jsonl")  # no record lost or doubled


def test_a_damaged_line_inside_metrics_is_named(toy_data, reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match="line 2 is not a metrics record") as caught:
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert str(metrics) in str(caught.value)


# Studies of different sizes -------------------------------------------------------------

def _mixed_dataset(path: Path, shapes) -> Path:
    from tgd_jax.pet.dataset import write_dataset
    from tgd_jax.sim.synthetic import toy_study

    rng = np.random.default_rng(0)
    studies = [toy_study(rng, shape, versions=("v1",), levels=(30.0,)) for shape in shapes]
    return write_dataset(path, studies, role="train", versions=("v1",), levels_s=(30.0,),
                         sim_config={"toy": True}, recon_settings={}, seed=0)


def test_studies_of_different_sizes_are_each_sampled_within_their_own_extent():
    from tgd_jax.pet import data as data_lib

    small, large = (4, 20, 24), (6, 40, 36)
    coded = [np.broadcast_to((np.arange(s[1])[:, None] * 1000 + np.arange(s[2]))[None],
                             s).astype(np.float32) + 1e6 * k for k, s in enumerate((small, large))]
    # the smaller study FIRST: the old sampler cropped every study to its size
    pairs = data_lib.PairSet(tuple(coded), np.array([[0, 0], [1, 1]]), ("small", "large"))
    corners = {0: set(), 1: set()}
    for step in range(300):
        batch = data_lib.sample_batch(pairs, seed=0, step=step, batch_size=8, patch_size=16,
                                      augment=False)
        for patch in batch["inputs"]:
            k = int(patch[0, 0, 1] // 1e6)
            y0, x0 = divmod(int(patch[0, 0, 1] - 1e6 * k), 1000)
            h, w = (small, large)[k][1:]
            assert 0 <= y0 <= h - 16 and 0 <= x0 <= w - 16
            corners[k].add((y0, x0))
    assert max(y for y, _ in corners[1]) > small[1] - 16  # the large study's far rows too
    assert max(y for y, _ in corners[1]) == large[1] - 16
    assert max(x for _, x in corners[0]) == small[2] - 16
    assert data_lib.steps_per_epoch(pairs, 16, 8) == -(-(2 * 1 * 1 + 4 * 2 * 2) // 8)


def test_one_size_draws_the_positions_it_always_drew():
    from tgd_jax.pet import data as data_lib

    vols = tuple(np.random.default_rng(k).normal(size=(5, 24, 28)).astype(np.float32)
                 for k in range(2))
    pairs = data_lib.PairSet(vols, np.array([[0, 1]]), ("a", "b"))
    batch = data_lib.sample_batch(pairs, seed=3, step=7, batch_size=4, patch_size=8,
                                  augment=False)
    rng = np.random.default_rng([3, 7, data_lib.STREAM_TRAIN, 0])  # the original draws
    rng.integers(1, size=4)
    zs, ys, xs = (rng.integers(1, 4, size=4), rng.integers(0, 17, size=4),
                  rng.integers(0, 21, size=4))
    for i in range(4):
        expected = vols[0][zs[i] - 1:zs[i] + 2, ys[i]:ys[i] + 8, xs[i]:xs[i] + 8]
        np.testing.assert_array_equal(batch["inputs"][i], np.moveaxis(expected, 0, -1))


@pytest.mark.parametrize("order", ["small-first", "small-later"])
def test_a_study_smaller_than_the_patch_is_refused_before_the_workdir(tmp_path, order):
    shapes = [(5, 16, 16), (5, 32, 32), (5, 32, 32)]
    if order == "small-later":
        shapes = shapes[::-1]
    data = _mixed_dataset(tmp_path / "mixed.h5", shapes)
    workdir = tmp_path / "run"
    config = tiny_train_config(data, **{"data.patch_size": 24, "data.val_studies": 0})
    from tgd_jax.pet.dataset import DatasetError

    with pytest.raises(DatasetError, match="16 x 16 slices are smaller than data.patch_size 24"):
        pipeline.train(config, workdir, log=quiet)
    assert not workdir.exists()
    # a patch every study holds trains on both sizes
    config = tiny_train_config(data, **{"data.patch_size": 16, "data.val_studies": 0})
    summary = pipeline.train(config, workdir, log=quiet)
    assert summary["steps"] == 12


# Every refusal before the workdir exists --------------------------------------------------

@pytest.mark.parametrize("overrides,named", [
    ({"num_steps": 0, "num_epochs": float("inf")}, "config.num_epochs"),
    ({"model.features": (0, 8, 3)}, "config.model.features"),
    ({"model.width_multiplier": 0.0}, "config.model.width_multiplier"),
    ({"seed": -1}, "config.seed"),
    ({"model.bn_momentum": float("nan")}, "config.model.bn_momentum"),
    ({"optimizer.name": "sgd", "optimizer.momentum": float("nan")}, "config.optimizer.momentum"),
    ({"keep_steps": (100,)}, "config.keep_steps"),
    ({"data.patch_size": 1000}, "data.patch_size 1000"),
])
def test_a_bad_field_is_refused_before_the_workdir_exists(toy_data, tmp_path, overrides, named):
    from tgd_jax.io.errors import UsageError

    workdir = tmp_path / "run"
    with pytest.raises(UsageError, match=named.replace(".", r"\.")):
        pipeline.train(tiny_train_config(toy_data["train"], **overrides), workdir, log=quiet)
    assert not workdir.exists()


def test_a_finetune_refusal_of_the_plan_leaves_nothing(toy_data, pretrained, tmp_path):
    from tgd_jax.pet import config as config_lib

    config = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "method": "last_k", "last_k": 100})
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="last_k=100"):
        pipeline.finetune(config, workdir, log=quiet)
    assert not workdir.exists()


def test_an_empty_workdir_flag_is_refused(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "train.py"), "--workdir=",
                           "--config=configs/train.py:tiny"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "--workdir is empty" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# Only tgd-jax's errors are one-liners ---------------------------------------------------

def test_an_internal_valueerror_from_jax_keeps_its_traceback(capsys):
    import jax.numpy as jnp

    from tgd_jax.io import errors

    with pytest.raises(SystemExit) as caught, errors.reported("train.py"):
        jnp.concatenate([])  # JAX's own ValueError: a bug, not the user's input
    err = capsys.readouterr().err
    assert caught.value.code == 1
    assert "Traceback (most recent call last)" in err and "concatenate" in err
    assert err.strip().splitlines()[-1].startswith("train.py: internal error (ValueError)")
    assert "please report it" in err


@pytest.mark.parametrize("error, code", [
    ("usage", 2), ("config", 2), ("data", 2), ("run", 1), ("missing", 2), ("disk", 1)])
def test_the_errors_of_tgd_jax_and_of_the_users_files_are_one_line(capsys, error, code):
    from tgd_jax import errors as core
    from tgd_jax.io import errors

    raised = {"usage": core.UsageError("bad --phi"), "config": core.ConfigError("bad field"),
              "data": core.DataError("bad study"), "run": core.RunError("loss is NaN"),
              "missing": FileNotFoundError(2, "No such file", "x.h5"),
              "disk": OSError(28, "No space left on device", "y.h5")}[error]
    with pytest.raises(SystemExit) as caught, errors.reported("train.py"):
        raise raised
    err = capsys.readouterr().err
    assert caught.value.code == code and len(err.strip().splitlines()) == 1
    assert err.startswith("train.py: error: ") and "Traceback" not in err


def test_the_core_raises_tgd_errors():
    import jax.numpy as jnp

    import tgd_jax
    from tgd_jax import errors as core

    with pytest.raises(core.UsageError, match="alpha must be finite"):
        tgd_jax.kse_scores(jnp.ones((3, 3, 4, 8)), alpha=-1.0)
    with pytest.raises(ValueError):  # still a ValueError, for callers that catch that
        tgd_jax.kse_scores(jnp.ones((3, 3, 4, 8)), alpha=-1.0)
    assert issubclass(core.ConfigError, core.UsageError)
    assert issubclass(core.DataError, core.UsageError)


@pytest.mark.parametrize("flag, said", [("--examples=0", "--examples must be >= 1"),
                                        ("--phis=", "--phis is empty")])
def test_threshold_refuses_nothing_to_measure(pretrained, toy_data, tmp_path, flag, said):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "threshold"
    proc = subprocess.run([sys.executable, str(root / "threshold.py"),
                           f"--checkpoint={pretrained}", f"--data={toy_data['train']}",
                           f"--out={out}", flag], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert proc.returncode == 2 and said in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_report_only_on_a_folder_without_a_reproduction_names_it(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.h5").write_text("not a reproduction")
    proc = subprocess.run([sys.executable, str(root / "reproduce.py"), "--preset=tiny",
                           f"--out={tmp_path}", "--report_only"], capture_output=True,
                          text=True, cwd=root, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}: holds no reproduction" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# Write failures ------------------------------------------------------------------------

def test_a_file_size_limit_is_one_line_naming_the_file_and_the_run_resumes(toy_data,
                                                                            tmp_path):
    import os
    import subprocess
    import sys

    from tgd_jax.train.tensorboard import read_events

    root = Path(__file__).resolve().parent.parent

    def train(workdir: Path, limit: str = "unlimited") -> subprocess.CompletedProcess:
        # under the limit, the compilation cache off: JAX writes its entries in place, and a
        # limit would cut them (the unlimited runs load the session's programs)
        cache = {"TGD_COMPILATION_CACHE": "off"} if limit != "unlimited" else {}
        return subprocess.run(
            ["bash", "-c", f'ulimit -f {limit}; exec "$0" "$@"', sys.executable,
             str(root / "train.py"), f"--workdir={workdir}", "--config=configs/train.py:tiny",
             f"--config.data.path={toy_data['train']}"], capture_output=True, text=True,
            cwd=root, env={**os.environ, "TGD_CPU_DEVICES": "1", **cache}, timeout=300)

    run = tmp_path / "run"
    limited = train(run, "20")  # 20 KiB: the TensorBoard image events pass it first
    assert limited.returncode == 1, limited.stderr[-2000:]
    lines = limited.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in limited.stderr, limited.stderr[-2000:]
    assert "File too large" in lines[0] and str(run) in lines[0]
    # a run without the cache records none (tests/test_cli.py checks a run with one)
    assert json.loads((run / "versions.json").read_text())["compilation_cache"] is None
    resumed = train(run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = train(tmp_path / "reference")
    assert reference.returncode == 0
    assert _bytes(checkpoints.restore(run, "latest").params) == _bytes(
        checkpoints.restore(tmp_path / "reference", "latest").params)
    assert {e["step"] for e in read_events(run) if e["tag"] == "loss"} == {
        e["step"] for e in read_events(tmp_path / "reference") if e["tag"] == "loss"}


def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_the_workdir(
        toy_data, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(root / "train.py"), f"--workdir={workdir}",
                           "--config=configs/train.py:tiny", "--cpu_devices=3",
                           f"--config.data.path={toy_data['train']}"], capture_output=True,
                          text=True, cwd=root, timeout=300)
    assert proc.returncode == 2 and "not divisible by the 3 devices" in proc.stderr
    assert not workdir.exists()


def test_denoise_leaves_no_output_folder_when_it_refuses(pretrained, tmp_path):
    from tgd_jax.errors import UsageError
    from tgd_jax.pet.denoise import denoise_file

    out = tmp_path / "new" / "deeper" / "out.h5"
    with pytest.raises(UsageError, match="missing.h5: no such file"):
        denoise_file(pretrained, tmp_path / "missing.h5", out)
    assert not (tmp_path / "new").exists()


def test_a_torn_metrics_tail_never_demotes_a_better_best(tmp_path):
    """The newest records lost, the checkpoints intact: best/ keeps the true best."""
    from test_checkpoints import _state

    state, _ = _state()
    ckpt = checkpoints.Checkpointer(tmp_path, keep=5)
    records = []
    for step, loss in enumerate((5.0, 4.0, 3.0, 2.0, 1.0), 1):
        ckpt.save(step, state, {}, val_loss=loss)
        records.append({"step": step, "val_loss": loss})
    ckpt.close()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:4]) + "\x00" * 40)
    again = checkpoints.Checkpointer(tmp_path, keep=5, log=quiet)
    again.reconcile_best(metrics, 5, log=quiet)
    assert again.best_step == 5 and again.best_loss == 1.0
    again.close()
    # killed between best/5 and checkpoints/5: the resume from 4 keeps best/5, and the
    # rerun's step 5, a little better in its last bits, is not written over it
    shutil.rmtree(tmp_path / "checkpoints" / "5")
    again = checkpoints.Checkpointer(tmp_path, keep=5, log=quiet)
    again.reconcile_best(metrics, 4, log=quiet)
    assert again.best_step == 5
    assert again.save(5, state, {}, val_loss=0.999) is True
    again.wait()
    assert again.best_step == 5 and again.best_loss == 0.999
    again.close()


def test_a_damaged_job_record_or_before_file_is_named(tmp_path):
    from tgd_jax.errors import UsageError
    from tgd_jax.pet import report as report_lib
    from tgd_jax.pet import reproduce as rp

    bad = tmp_path / "report.json"
    for text in ("{garbled", "3"):
        bad.write_text(text)
        with pytest.raises(UsageError, match="report.json"):
            report_lib.with_before({}, bad)
    record = tmp_path / "job.json"
    record.write_text('{"wall_s": 1}')
    with pytest.raises(UsageError, match="not a job record"):
        rp._read_record(record)
