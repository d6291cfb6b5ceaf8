"""The generic runtime on a network that is not a denoiser: a CIFAR-shaped classifier
(random data) trained with a TGD plan through :func:`tgd_jax.train.trainer.fit`, in a fresh
interpreter that never imports the PET application or the simulator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r'''
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
import tgd_jax
from tgd_jax.train import parallel, trainer
from tgd_jax.train import step as step_lib

workdir, other = sys.argv[1], sys.argv[2]


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


model, batch_size = Classifier(), 8
x0 = jnp.zeros((batch_size, 32, 32, 3))
variables = model.init(jax.random.key(0), x0)
graph = tgd_jax.trace_topology(model.apply, variables, x0)
plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5, batch_stats=variables["batch_stats"])
mesh = parallel.make_mesh()
rows = parallel.process_rows(batch_size, mesh)


def batches(step):  # a pure function of the step: a resumed run sees the same batches
    rng = np.random.default_rng([7, step])
    inputs = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
    return {"inputs": inputs[rows], "targets": rng.integers(0, 10, batch_size)[rows]}


def run(folder, num_steps):
    tx = plan.optimizer(num_steps=6, learning_rate=1e-2, watch=False)
    state = step_lib.create_train_state(variables, tx, plan)
    step = functools.partial(step_lib.train_step, model=model, tx=tx, loss=loss)
    evaluate = trainer.Validator(
        parallel.jit_step(functools.partial(step_lib.eval_step, model=model, loss=loss), mesh,
                          donate_state=False),
        [parallel.shard_batch(batches(10_000 + i), mesh) for i in range(2)])
    seen = []
    hook = lambda step, state, events: seen.append(step)  # noqa: E731
    return (*trainer.fit(state, step, batches, evaluate, folder,
                         trainer.Cadence(num_steps=num_steps, eval_every=3, log_every=1),
                         hooks=[hook], mesh=mesh, log=lambda line: None), seen)


final, summary, seen = run(workdir, 6)
run(other, 3)
resumed, _, _ = run(other, 6)


def _get(tree, path):
    for k in path:
        tree = None if tree is None else tree[k.key]
    return tree


def frozen_and_changed(old, new, mask):
    """(every element the mask freezes is bit-identical, some retrained element moved)"""
    frozen_same, changed = True, False
    for path, o in jax.tree_util.tree_leaves_with_path(old):
        o, n, m = np.asarray(o), np.asarray(_get(new, path)), _get(mask, path)
        m = np.zeros(o.shape, bool) if m is None else np.broadcast_to(np.asarray(m), o.shape)
        frozen_same &= o[~m].tobytes() == n[~m].tobytes()
        changed |= bool((o[m] != n[m]).any())
    return frozen_same, changed


host = parallel.host_copy({"params": final.params, "batch_stats": final.batch_stats})
params_ok = frozen_and_changed(variables["params"], host["params"], plan.mask)
stats_ok = frozen_and_changed(variables["batch_stats"], host["batch_stats"], plan.stats_mask)
same = all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(
    jax.tree.leaves(parallel.host_copy(final.params)),
    jax.tree.leaves(parallel.host_copy(resumed.params)), strict=True))
loaded = sorted(m for m in sys.modules if m.startswith(("tgd_jax.pet", "tgd_jax.sim")))
print(json.dumps({"summary": summary, "hooks": seen, "params": params_ok, "stats": stats_ok,
                  "resumed_same": same, "loaded": loaded,
                  "retrained": plan.summary["params_retrained"],
                  "total": plan.summary["params_total"]}))
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder / "a"), str(folder / "b")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), folder


def test_the_runtime_trains_a_classifier_without_the_pet_application(result):
    r, folder = result
    assert r["loaded"] == []
    assert 0 < r["retrained"] < r["total"]
    assert r["params"] == [True, True]  # frozen bit-identical, retrained moved
    assert r["stats"] == [True, True]  # the same for the BatchNorm statistics
    assert r["summary"]["steps"] == 6 and r["hooks"] == [0, 3, 6]
    records = [json.loads(line) for line in (folder / "a" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (folder / "a" / "checkpoints").is_dir()


def test_a_run_extended_from_its_checkpoint_ends_where_one_run_does(result):
    assert result[0]["resumed_same"]
