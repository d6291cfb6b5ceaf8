# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv from pyproject.toml when it is missing; nothing else is
# installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv test test-fast lint docs demo reproduce premise bench bench-gpu clean

venv: $(STAMP)

# scico 0.0.7 is a test dependency (tests/test_foreign.py runs its UNet as a user would)
# installed without its own: it pins jax <= 0.8.1, which ours is past, and its models need
# only flax; pip cannot express that in pyproject.toml.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps 'scico==0.0.7'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Whole files per worker (--dist loadfile): the slowest fixtures (the tiny reproduction,
# the multi-process runs) are module-scoped and must be built once, not once per worker.
# --no-loadscope-reorder: files are handed out in collection order, which tests/conftest.py
# sorts heaviest first; xdist's default order (most tests first) started the tiny
# reproduction halfway through and left one worker finishing it alone.
# (--dist loadgroup would be finer, but pytest-xdist 3.8 cannot group under pytest 9:
# the group suffix never reaches the node id, pytest-xdist issue #1386.)
XDIST = -n 2 --dist loadfile --no-loadscope-reorder

test: lint
	$(PY) -m pytest $(XDIST) -q

# The edit-test loop: everything but the tests marked slow (whole pipelines run as
# commands: the tiny reproduction, several processes, the simulator's CLI); see docs/suite.md.
test-fast: lint
	$(PY) -m pytest $(XDIST) -q -m "not slow"

# The documentation site, docs/_build/html: warnings are errors, then every internal link
# of the built pages is checked (external ones are not: CI has no internet), and every
# public name must be in the API reference.
DOCS_STAMP = $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(PY) docs/_ext/check_links.py docs/_build/html
	$(PY) docs/_ext/check_api.py docs/_build/html

# The paper end to end at CPU scale (reproduce.py --preset=demo): datasets and the
# simulator's report, v1-net and v2-net, the threshold study, FT-net, TGD-net (both modes),
# full fine-tuning, random and L1 masks, online TGD_N2N / TGD^2_N2N / plain N2N, the test
# metrics of every network, then runs/demo/report.md with its figures. Resumable.
demo: $(STAMP)
	$(PY) reproduce.py --preset=demo

# Any preset: make reproduce PRESET=study (3 seeds, ~1 h on 2 cores) or PRESET=paper (GPU).
PRESET ?= study
reproduce: $(STAMP)
	$(PY) reproduce.py --preset=$(PRESET)

# The sweep behind the README's "premise" section (pretraining recipes x 3 seeds, threshold
# studies, fine-tuning methods and learning rates): hours on 2 cores; resumable.
DATA = runs/premise/data
premise: $(STAMP)
	test -f $(DATA)/train.h5 || $(PY) -m tgd_jax.sim --preset=demo --out=$(DATA)
	$(PY) experiments/premise.py --out=runs/premise --data=$(DATA)

# Every speed figure (train step vs PyTorch, TGD overhead, KSE, OSEM, device scaling) in one
# run: runs/bench/bench.{json,md}; benchmarks/RESULTS.md holds a dated copy.
# The section "train" measures every supported jax: .venv (Python 3.11: jax 0.10) and, where a
# Python 3.12 is installed (pip then gives a newer jax), .venv312 made from it.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
                         $(shell command -v python3.12 2>/dev/null))
VENV312    = .venv312
comma     := ,
$(VENV312)/.installed: pyproject.toml Makefile
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -e .
	touch $@

bench: $(STAMP) $(if $(PYTHON312),$(VENV312)/.installed)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks --out=runs/bench \
	    --pythons=$(PY)$(if $(PYTHON312),$(comma)$(VENV312)/bin/python)

# The same benchmark on a GPU: float32 and bfloat16, with batches that fill the card, MFU
# against the measured matmul peak of each dtype (benchmarks/RESULTS.md, GPU section).
bench-gpu: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks --out=runs/bench-gpu --sections=peak,step,tgd,kse \
	    --sizes=demo,paper,paper-b256,paper-b1024 --dtypes=float32,bfloat16

clean:
	rm -rf $(VENV) $(VENV312) runs .pytest_cache docs/_build docs/_generated
