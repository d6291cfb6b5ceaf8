"""Shared test fixtures: tiny models and a brute-force NumPy KSE written from the formulas."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import jax
import numpy as np

from tgd_jax.io import startup
from tgd_jax.sim import cache as sim_cache

# Commands started by the tests keep their compiled programs (tgd_jax.io.startup) and the
# simulator its count calibration (tgd_jax.sim.cache) in throw-away folders of this test
# run, not in the user's ~/.cache. The controller names them by an id of its own; its
# workers share them (they inherit its environment, and their xdist run id is that id too:
# pytest_configure), and it removes them once they have ended (pytest_unconfigure). A
# worker, or a pytest started inside one, never removes them.
_OWNER = not os.environ.get("PYTEST_XDIST_WORKER")
_RUN = uuid.uuid4().hex if _OWNER else os.environ.get("PYTEST_XDIST_TESTRUNUID", "worker")


def _scratch(run: str) -> Path:
    return Path(tempfile.gettempdir()) / f"tgd-tests-{run}"


os.environ.setdefault(startup.COMPILATION_CACHE_ENV, str(_scratch(_RUN) / "xla"))
os.environ.setdefault(sim_cache.SIM_CACHE_ENV, str(_scratch(_RUN) / "sim"))
# ... and use one CPU device each (the commands' default is one per core): the two xdist
# workers already fill the machine's cores, and tests compare commands with in-process runs,
# which have one device. tests/test_multiprocess.py runs a command with the default.
os.environ["TGD_CPU_DEVICES"] = "1"  # also over a user's export
os.environ.pop("TGD_ONE_STEP_IN_FLIGHT", None)  # the trainer's default, whatever is exported

# Threefry's XLA:CPU compile takes ~1.5 s per distinct shape on the CI machine, which would
# dominate a suite of tiny models. The library is PRNG-agnostic (keys are passed in), so the
# suite uses the fast-compiling "rbg" generator; tests that need threefry set it themselves.
# The commands the tests start use it too (JAX reads $JAX_DEFAULT_PRNG_IMPL): a cold tiny
# train.py took 10.9 s of CPU with threefry and 6.4 s with rbg, and the test processes and
# the commands then compile the same programs, which the shared cache below holds once.
os.environ["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
jax.config.update("jax_default_prng_impl", "rbg")
# Most of the suite's CPU is XLA compiling thousands of small programs that then run for
# milliseconds (docs/suite.md). JAX's own switch for that case (LLVM at -O0, no expensive
# passes) cut the compilation of the tiny networks' training steps by a third; it changes
# no program's meaning, only how fast it runs, and every comparison of the suite is between
# programs compiled the same way (the commands inherit it). The simulator's tests, whose
# programs run for seconds, restore full optimisation (the `optimized_xla` fixture).
_NO_OPT = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ[_NO_OPT] = "1"  # also over a user's export
jax.config.update("jax_disable_most_optimizations", True)
# The test processes themselves (both xdist workers) share that cache with the commands:
# the same tiny networks' programs are compiled once per suite, not once per process.
startup.use_compilation_cache(os.environ["TGD_COMPILATION_CACHE"])


def reference_normalize(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    if hi - lo > 1e-5 * hi:  # the library's tie tolerance (float32 rounding)
        return (x - lo) / (hi - lo)
    return np.ones_like(x) if hi > 0 else np.zeros_like(x)


def reference_kse(kernel, alpha: float = 1.0, k: int = 5, groups: int = 1):
    """Loops straight from the paper's formulas, float64. Returns (s, dm, e, kse).

    ``groups > 1``: a grouped conv's kernel ``(*spatial, C_in / groups, C_out)``; input
    channel ``c`` is read through slot ``c % (C_in / groups)`` by the outputs of group
    ``c // (C_in / groups)`` only, and its kernels are those."""
    w = np.asarray(kernel, np.float64)
    per_in, c_out = w.shape[-2:]
    c_in, n_out = per_in * groups, c_out // groups
    kk = max(0, min(k, n_out - 1))
    s = np.zeros(c_in)
    dm = np.zeros((c_in, n_out))
    e = np.zeros(c_in)
    for c in range(c_in):
        g, j = divmod(c, per_in)
        group = [w[..., j, g * n_out + n].ravel() for n in range(n_out)]
        s[c] = sum(np.abs(g).sum() for g in group)
        for i in range(n_out):
            dists = sorted(
                np.sqrt(((group[i] - group[j]) ** 2).sum()) for j in range(n_out) if j != i
            )
            dm[c, i] = sum(dists[:kk])
        total = dm[c].sum()
        for i in range(n_out):
            p = dm[c, i] / total if total > 0 else 0.0
            if p > 0:
                e[c] -= p * np.log2(p)
    sn, en = reference_normalize(s), reference_normalize(e)
    score = reference_normalize(np.sqrt(sn / (1 + alpha * en)))
    return s, dm, e, score



# --- tiny models -------------------------------------------------------------------------

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from tgd_jax.pet.models import DnCNN  # noqa: E402

TINY_FEATURES = (8, 8, 12, 6, 3)


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(10, (3, 3), use_bias=False, name="conv_a")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm_a")(x))
        return nn.relu(nn.Conv(5, (3, 3), name="conv_b")(x))


class OtherNet(nn.Module):
    """A user's differently named convnet: a nested block, a bias-free conv, a dense head."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), name="stem")(x))
        x = Encoder(name="encoder")(x, train)
        x = nn.Conv(4, (1, 1), name="proj")(x)
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


OTHER_TOPOLOGY_ARGS = dict(
    convs=["stem", "encoder/conv_a", "encoder/conv_b", "proj"],
    norms={"encoder/conv_a": "encoder/norm_a"},
)


def frozen_and_retrained(mask, before, after):
    """Per leaf: (frozen before, frozen after, retrained before, retrained after) values."""
    for m, b, a in zip(
        jax.tree.leaves(mask, is_leaf=lambda x: x is None),
        jax.tree.leaves(before),
        jax.tree.leaves(after),
        strict=True,
    ):
        m = np.zeros(b.shape, bool) if m is None else np.broadcast_to(m, b.shape)
        b, a = np.asarray(b), np.asarray(a)
        yield b[~m], a[~m], b[m], a[m]


@pytest.fixture(scope="module")
def optimized_xla():
    """XLA's full optimisation for a module's programs and the commands it starts: the
    simulator's projections and reconstructions run for seconds, and unoptimised its tests
    took 40 % more CPU (docs/suite.md). Programs compiled before stay as they were, which
    changes their speed, not their results' meaning."""
    jax.config.update("jax_disable_most_optimizations", False)
    del os.environ[_NO_OPT]
    yield
    os.environ[_NO_OPT] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def tiny_dncnn():
    """(model, variables) of a small gated DnCNN, initialised from a fixed key."""
    model = DnCNN(features=TINY_FEATURES, use_gates=True)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return model, variables


# --- toy datasets and a pretrained tiny network, shared by the pipeline tests -----------

from tgd_jax.pet import config as config_lib  # noqa: E402
from tgd_jax.pet import pipeline  # noqa: E402
from tgd_jax.sim.synthetic import write_toy_datasets  # noqa: E402


def quiet(message: str) -> None:
    del message


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A folder built by ``build(folder)`` once per test session. Under pytest-xdist the
    workers share it: the first to ask builds it under a file lock in the session's common
    temporary folder, the others wait and reuse it (it was built once per worker). Tests
    only read it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # /tmp/pytest-of-<user>/pytest-<n>: this session's workers'
    folder = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """train/finetune/test/online HDF5 files of (5, 32, 32) toy studies."""
    folder = shared_once(tmp_path_factory, "toy_data", write_toy_datasets)
    return {role: folder / f"{role}.h5" for role in ("train", "finetune", "test", "online")}


def tiny_train_config(path, **overrides):
    return config_lib.override(config_lib.train_config("tiny"), **{"data.path": str(path)},
                               **overrides)


@pytest.fixture(scope="session")
def pretrained(toy_data, tmp_path_factory):
    """Workdir of a tiny DnCNN trained 12 steps on toy v1 images (shared by the workers:
    read it, or copy it to train in it)."""
    return shared_once(tmp_path_factory, "pretrained", lambda workdir: pipeline.train(
        tiny_train_config(toy_data["train"]), workdir, log=quiet))


#: Files from the heaviest down, by their measured CPU (docs/suite.md): under ``make test``
#: (``--dist loadfile --no-loadscope-reorder``) xdist hands out whole files in collection
#: order, so the heavy module fixtures start first and the other worker fills the time
#: beside them with light files instead of one worker finishing a heavy file alone at the end.
SLOWEST_FILES = (
    "test_reproduce.py", "test_multiprocess.py", "test_any_convnet.py",
    "test_models_pipeline.py", "test_sim.py", "test_no_loss.py", "test_readme.py",
    "test_cli.py", "test_premise.py", "test_pipeline.py", "test_hostile.py",
    "test_hostile2.py", "test_kse.py", "test_step.py", "test_trace.py", "test_wheel.py",
    "test_foreign.py", "test_gate.py", "test_sim_cli.py",
)


def pytest_configure(config):
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", "") is None:
        config.option.testrunuid = _RUN  # xdist's --testrunuid: the workers' id is ours


def pytest_unconfigure(config):
    if _OWNER and not hasattr(config, "workerinput"):  # the controller, its workers ended
        shutil.rmtree(_scratch(_RUN), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    del config
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    # Stable sort: the order within a file, and among the unranked files, is kept.
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))


# --- the suite's cost in CPU seconds (docs/suite.md) ------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--cpu-report", metavar="PATH", default=None,
                     help="append one JSON line per test to PATH: its CPU seconds (this process's "
                          "threads plus the commands it started and waited for), setup and "
                          "teardown included. Unlike wall time, it does not depend on the load.")


def _cpu_seconds() -> float:
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = item.config.getoption("--cpu-report")
    if not path:
        yield
        return
    import json
    import time

    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    row = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
           "cpu_s": round(_cpu_seconds() - cpu, 2),
           "wall_s": round(time.perf_counter() - wall, 2)}
    with open(path, "a") as handle:  # one short line per write: workers may share the file
        handle.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def pinned(cores: set[int] | None):
    """Processes started in the block run on ``cores`` only (None: unchanged): the calling
    thread's CPU affinity, which a child inherits, is set for the block and restored
    (no ``preexec_fn``, which would fork a multithreaded JAX process)."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
