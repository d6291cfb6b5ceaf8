# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv from pyproject.toml when it is missing; nothing else is
# installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv test lint demo premise bench clean

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

# The paper's pipeline at CPU scale on the simulator: datasets (+ their measured report),
# v1-net (coupled L2, cosine: the measured recipe) and its threshold study, then FT-net
# (last 3 blocks) and TGD-net fine-tuned on 2 low-BMI v2 studies, judged on the held-out
# study's v2 images (new task) and v1 images (old task), noise-2-noise online TGD on the OOD
# study, and the test metrics of every network.
DATA = runs/demo/data
HELDOUT = --config.validation.path=$(DATA)/train.h5 --config.validation.version=v2 \
    --config.old_task.path=$(DATA)/train.h5 --config.old_task.version=v1
demo: $(STAMP)
	$(PY) -m tgd_jax.sim --preset=demo --out=$(DATA)
	$(PY) -m tgd_jax.sim --report --out=$(DATA)
	$(PY) train.py --workdir=runs/demo/v1net --config=configs/train.py:demo \
	    --config.data.path=$(DATA)/train.h5 --config.data.version=v1
	$(PY) threshold.py --checkpoint=runs/demo/v1net --data=$(DATA)/train.h5 --version=v1 \
	    --studies=1 --out=runs/demo/v1net/threshold
	$(PY) finetune.py --workdir=runs/demo/tgdnet --config=configs/finetune.py:demo \
	    --config.data.path=$(DATA)/finetune.h5 --checkpoint=runs/demo/v1net --method=tgd $(HELDOUT)
	$(PY) finetune.py --workdir=runs/demo/ftnet --config=configs/finetune.py:demo \
	    --config.data.path=$(DATA)/finetune.h5 --checkpoint=runs/demo/v1net --method=last_k \
	    $(HELDOUT)
	$(PY) online.py --workdir=runs/demo/online --config=configs/online.py:demo \
	    --config.data.path=$(DATA)/online.h5 --checkpoint=runs/demo/tgdnet
	$(PY) evaluate.py --test=$(DATA)/test.h5 --out=runs/demo/evaluation \
	    --net=v1-net=runs/demo/v1net --net=FT-net=runs/demo/ftnet --net=TGD-net=runs/demo/tgdnet

# The sweep behind the README's "premise" section (pretraining recipes x 3 seeds, threshold
# studies, fine-tuning methods and learning rates): hours on 2 cores; resumable.
premise: $(STAMP)
	test -f $(DATA)/train.h5 || $(PY) -m tgd_jax.sim --preset=demo --out=$(DATA)
	$(PY) experiments/premise.py --out=runs/premise --data=$(DATA)

# Every speed figure (train step vs PyTorch, TGD overhead, KSE, OSEM, device scaling) in one
# run: runs/bench/bench.{json,md}; benchmarks/RESULTS.md holds a dated copy.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks --out=runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
