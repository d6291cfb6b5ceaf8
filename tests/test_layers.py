"""The package's layers: core <- runtime <- application, imports only pointing downwards."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tgd_jax.train import parallel

PACKAGE = Path(__file__).resolve().parent.parent / "tgd_jax"
#: What each layer may not import (module prefixes).
FORBIDDEN = {
    "core": ("tgd_jax.train", "tgd_jax.pet", "tgd_jax.sim", "h5py", "orbax", "absl",
             "ml_collections", "matplotlib"),
    "runtime": ("tgd_jax.pet", "tgd_jax.sim"),
    "application": (),
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1:
        return "core"
    return "runtime" if parts[0] == "train" else "application"


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
    assert layers == {"core", "runtime", "application"}
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


def test_quiet_start_drops_only_the_backend_probe_line():
    logger = logging.getLogger("jax._src.xla_bridge")
    parallel.quiet_start()
    parallel.quiet_start()  # idempotent
    assert sum(isinstance(f, parallel._DropBackendProbe) for f in logger.filters) == 1

    def passes(level, message):
        record = logger.makeRecord(logger.name, level, __file__, 1, message, (), None)
        return all(f.filter(record) for f in logger.filters)

    assert not passes(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: ...")
    assert passes(logging.WARNING, "Unable to initialize backend 'cuda': driver too old")
    assert passes(logging.INFO, "Some other backend message")
