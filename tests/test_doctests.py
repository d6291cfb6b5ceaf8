"""The examples in the core's docstrings run, and every public function and class has one."""

from __future__ import annotations

import doctest
import inspect

import pytest

from tgd_jax import (
    autogate,
    gate,
    graph,
    kse,
    masks,
    methods,
    optim,
    rule,
    threshold,
    topology,
    trace,
)

CORE = (kse, topology, graph, trace, masks, rule, methods, optim, gate, autogate,
        threshold)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("module", CORE, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in finder.find(module):
        runner.run(test, out=report.append)
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0
    assert summary.failed == 0, "".join(report)


def _public_callables():
    for module in CORE:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield pytest.param(obj, id=f"{module.__name__}.{name}")


@pytest.mark.parametrize("obj", list(_public_callables()))
def test_every_public_function_has_an_example(obj):
    assert ">>> " in (obj.__doc__ or ""), f"{obj.__qualname__} has no runnable example"
