"""The package's layers, imports only pointing downwards: the core <- the shared I/O <- the
training runtime <- the PET application; the simulator beside the runtime, on the I/O and
the PET dataset schema only."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tgd_jax.io import startup

PACKAGE = Path(__file__).resolve().parent.parent / "tgd_jax"
_PET_BUT_THE_SCHEMA = ("tgd_jax.pet.config", "tgd_jax.pet.data", "tgd_jax.pet.models",
                       "tgd_jax.pet.pipeline", "tgd_jax.pet.training", "tgd_jax.pet.cli",
                       "tgd_jax.pet.commands", "tgd_jax.pet.reproduce", "tgd_jax.pet.report",
                       "tgd_jax.pet.evaluate", "tgd_jax.pet.denoise", "tgd_jax.pet.premise",
                       "tgd_jax.pet.baseline", "tgd_jax.pet.l2sp", "tgd_jax.pet.configs")
#: What each layer may not import (module prefixes).
FORBIDDEN = {
    "core": ("tgd_jax.io", "tgd_jax.train", "tgd_jax.pet", "tgd_jax.sim", "h5py", "orbax",
             "absl", "ml_collections", "matplotlib"),
    "io": ("tgd_jax.train", "tgd_jax.pet", "tgd_jax.sim"),
    # the dataset schema: what the simulator writes and the application reads
    "schema": ("tgd_jax.train", "tgd_jax.sim") + _PET_BUT_THE_SCHEMA,
    "runtime": ("tgd_jax.pet", "tgd_jax.sim"),
    "simulator": ("tgd_jax.train",) + _PET_BUT_THE_SCHEMA,
    "application": (),
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1:
        return "core"
    if parts == ("pet", "dataset.py"):
        return "schema"
    return {"io": "io", "train": "runtime", "sim": "simulator"}.get(parts[0], "application")


def _imports(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` statement names, at any depth."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    layers = {_layer(p) for p in _modules()}
    assert layers == set(FORBIDDEN)
    pet = {p.relative_to(PACKAGE).parts[1].removesuffix(".py") for p in _modules()
           if _layer(p) == "application"} - {"__init__"}
    assert {f"tgd_jax.pet.{name}" for name in pet} == set(_PET_BUT_THE_SCHEMA)
    core = {p.stem for p in _modules() if _layer(p) == "core"}
    assert core == {"__init__", "autogate", "batchnorm", "errors", "gate", "graph", "kse", "masks",
                    "methods", "optim", "rule", "threshold", "topology", "trace"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downwards(path):
    forbidden = FORBIDDEN[_layer(path)]
    bad = [name for name in _imports(path)
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{path.relative_to(PACKAGE)} ({_layer(path)}) imports {bad}"


def test_the_checker_sees_a_violation(tmp_path):
    # The static check above must be able to fail: a core-like file importing the runtime.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tgd_jax.train import step\n    import h5py\n")
    assert {"tgd_jax.train", "tgd_jax.train.step", "h5py"} <= set(_imports(bad))


def test_importing_the_core_loads_no_runtime_and_no_io_library():
    # Independent of the static check: what a fresh interpreter actually loads (absl is
    # not listed: optax itself imports absl.logging).
    code = ("import sys, tgd_jax, tgd_jax.threshold\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('h5py', 'orbax', 'ml_collections', 'matplotlib') "
            "or m.startswith(('tgd_jax.train', 'tgd_jax.pet', 'tgd_jax.sim')))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("modules, forbidden", [
    (("tgd_jax.train.trainer", "tgd_jax.train.checkpoints", "tgd_jax.train.step"),
     ("tgd_jax.pet", "tgd_jax.sim")),
    (("tgd_jax.sim.__main__", "tgd_jax.sim.report", "tgd_jax.sim.synthetic"),
     ("tgd_jax.train",) + _PET_BUT_THE_SCHEMA),
], ids=["runtime", "simulator"])
def test_importing_a_layer_loads_nothing_above_it(modules, forbidden):
    # What a fresh interpreter actually loads, the static check's independent twin.
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules for f in {forbidden!r} "
            f"if m == f or m.startswith(f + '.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_quiet_start_drops_only_the_backend_probe_line():
    logger = logging.getLogger("jax._src.xla_bridge")
    startup.quiet_start()
    startup.quiet_start()  # idempotent
    assert sum(isinstance(f, startup._DropBackendProbe) for f in logger.filters) == 1

    def passes(level, message):
        record = logger.makeRecord(logger.name, level, __file__, 1, message, (), None)
        return all(f.filter(record) for f in logger.filters)

    assert not passes(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: ...")
    assert passes(logging.WARNING, "Unable to initialize backend 'cuda': driver too old")
    assert passes(logging.INFO, "Some other backend message")
