# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv from pyproject.toml when it is missing; nothing else is
# installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -n 2 -q

# Until the training pipeline lands: simulate the demo PET datasets and measure them, then
# run the end-to-end TGD demo (pretrain -> KSE masks -> TGD fine-tuning) on synthetic data.
demo: $(STAMP)
	$(PY) -m tgd_jax.sim --preset=demo --out=runs/demo/data
	$(PY) -m tgd_jax.sim --report --out=runs/demo/data
	$(PY) -m tgd_jax.demo --workdir runs/demo/tgd

clean:
	rm -rf $(VENV) runs .pytest_cache
