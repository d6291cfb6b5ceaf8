"""The regulariser, the threshold study, the gradient cosine, frozen BatchNorm statistics,
TGD^n with gates, and the held-out sets of fine-tuning; each against an independent truth."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_FEATURES, frozen_and_retrained, pinned, quiet

from tgd_jax import masks, optim
from tgd_jax import threshold as threshold_lib
from tgd_jax.batchnorm import running_statistics
from tgd_jax.graph import flat_paths
from tgd_jax.methods import tgd_plan
from tgd_jax.optim import make_optimizer
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import pipeline
from tgd_jax.pet import premise as premise_lib
from tgd_jax.pet.models import DnCNN
from tgd_jax.topology import ConvNode
from tgd_jax.train import checkpoints, parallel, step

# --- the regulariser ----------------------------------------------------------------------


def test_kernel_l2_adds_l2_times_w_to_kernels_only():
    params = {"conv": {"kernel": jnp.arange(6.0).reshape(1, 1, 2, 3), "bias": jnp.ones(3)},
              "bn": {"scale": jnp.full(3, 2.0), "bias": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    out, _ = optim.kernel_l2(0.1).update(grads, optim.kernel_l2(0.1).init(params), params)
    # the gradient of the loss term (0.1 / 2) * sum(kernel ** 2), written out by hand
    np.testing.assert_allclose(out["conv"]["kernel"], 0.5 + 0.1 * np.arange(6.0).reshape(
        1, 1, 2, 3), rtol=1e-6)
    for path in (("conv", "bias"), ("bn", "scale"), ("bn", "bias")):
        np.testing.assert_array_equal(out[path[0]][path[1]], 0.5)


def test_coupled_l2_under_adam_decays_an_unused_weight_and_adamw_barely_does():
    # A weight with zero data gradient: coupled L2's gradient l2 * w is normalised by Adam
    # into steps of about lr, so w = 0.5 reaches 0 within 0.5 / lr steps; decoupled decay
    # multiplies it by (1 - lr * wd) per step: 0.5 * (1 - 1e-5) ** 100 = 0.4995.
    params = {"kernel": jnp.array([0.5, -0.5])}
    zero = {"kernel": jnp.zeros(2)}

    def run(tx, steps=100):
        p, s = params, tx.init(params)
        for _ in range(steps):
            u, s = tx.update(zero, s, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["kernel"])

    coupled = run(optax.chain(optim.kernel_l2(1e-3), optax.adam(1e-2)))
    decoupled = run(optax.adamw(1e-2, weight_decay=1e-3))
    assert np.all(np.abs(coupled) < 0.02), coupled
    np.testing.assert_allclose(np.abs(decoupled), 0.5 * (1 - 1e-5) ** 100, rtol=1e-5)


def test_frozen_elements_get_no_regulariser_update(tiny_dncnn):
    model, variables = tiny_dncnn
    params = variables["params"]
    mask = tgd_plan(params, model.topology(), 0.5,
                    batch_stats=variables["batch_stats"]).mask
    c = config_lib.train_config("tiny")
    c.optimizer.l2 = 1e-2
    tx = optim.tgd(make_optimizer(num_steps=10, **c.optimizer), mask)
    zero = jax.tree.map(jnp.zeros_like, params)  # only the regulariser pulls
    p, s = params, tx.init(params)
    for _ in range(5):
        u, s = tx.update(zero, s, p)
        p = optax.apply_updates(p, u)
    shrunk = 0
    for fb, fa, rb, ra in frozen_and_retrained(mask, params, p):
        assert fb.tobytes() == fa.tobytes()
        shrunk += int(np.sum(np.abs(ra) < np.abs(rb)))
    assert shrunk > 0  # the retrained kernels did decay


@pytest.mark.parametrize("bad", [-1e-3, float("nan")])
def test_negative_or_nan_l2_is_refused(bad):
    c = config_lib.train_config("tiny")
    c.optimizer.l2 = bad
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        make_optimizer(num_steps=10, **c.optimizer)


@pytest.mark.parametrize("batch, cores, expected", [(16, 2, 2), (16, 12, 8), (6, 4, 3),
                                                    (7, 2, 1), (32, 1, 1)])
def test_cpu_device_count_divides_the_batch(batch, cores, expected):
    assert parallel.cpu_device_count(batch, cores) == expected


# --- the threshold study ------------------------------------------------------------------


def _network_with_dead_channels():
    """A tiny DnCNN in which every consumer ignores input channels 0 and 1 (their weights
    are zero), so output channels 0 and 1 of every layer but the last are truly useless."""
    model = DnCNN(features=TINY_FEATURES)
    variables = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 3)))
    params = jax.tree.map(np.array, variables["params"])
    for i in range(2, len(TINY_FEATURES) + 1):
        params[f"conv{i}"]["kernel"][:, :, :2, :] = 0.0
    return model, {"params": params, "batch_stats": variables["batch_stats"]}


def test_zeroing_truly_useless_kernels_leaves_the_output_bit_identical():
    model, variables = _network_with_dead_channels()
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
    target = x * 0.5

    def evaluate(p):
        y = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
        return float(jnp.mean((y - target) ** 2)), np.asarray(y)

    result = threshold_lib.threshold_study(variables["params"], model.topology(), evaluate,
                                           np.asarray(x), phis=(0.3,), key=jax.random.key(0))
    (row,) = result["rows"]
    # KSE picks exactly the dead channels (sparsity 0) ...
    for layer, (retrained, total) in row["channels"].items():
        assert retrained == (0 if layer == f"conv{len(TINY_FEATURES)}" else 2), (layer, total)
    # ... and dropping them changes nothing, while the same counts at random do
    assert row["kse"]["loss"] == result["intact_loss"]
    assert row["kse"]["output_change"] == 0.0
    assert row["random"]["output_change"] > 0.01
    assert row["fraction"] > 0
    assert all(v == 0.0 for v in row["consumer_share"].values())  # nobody reads them


def test_consumer_share_by_hand():
    params = {"a": {"kernel": np.ones((1, 1, 1, 3))},
              "b": {"kernel": np.array([[[[1.0], [2.0], [7.0]]]])}}  # reads maps 0, 1, 2
    topo = [ConvNode("a", consumer="b"), ConvNode("b")]
    share = threshold_lib.consumer_share(params, topo, {"a": np.array([False, True, True]),
                                                        "b": np.array([False])})
    assert share == {"a": 0.9}


def test_output_change_is_relative_to_the_denoising():
    x = np.zeros(4)
    intact = np.array([1.0, 0, 0, 0])  # the network changes x by norm 1
    assert threshold_lib.output_change(np.array([1.0, 0, 0, 0.5]), intact, x) == 0.5


def test_threshold_checkpoint_writes_its_files(toy_data, pretrained, tmp_path):
    result = premise_lib.threshold_checkpoint(str(pretrained), str(toy_data["train"]),
                                              tmp_path, examples=8, phis=(0.3, 0.6),
                                              random_draws=2, log=quiet)
    saved = json.loads((tmp_path / "threshold.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 2
    assert saved["rows"][1]["fraction"] >= saved["rows"][0]["fraction"]
    assert (tmp_path / "threshold.png").stat().st_size > 0
    assert (tmp_path / "kse_hist.png").stat().st_size > 0


# --- TGD's gradient, frozen BatchNorm, TGD^n ---------------------------------------------


def _batch(key=0):
    x = jax.random.normal(jax.random.key(key), (4, 8, 8, 3))
    return {"inputs": x, "targets": 0.5 * x}


def test_gate_cosine_matches_an_independent_computation(tiny_dncnn):
    model, variables = tiny_dncnn
    params = variables["params"]
    tgd = tgd_plan(params, model.topology(), 0.5, mode="paper",
                   batch_stats=variables["batch_stats"])
    tx = tgd.optimizer(optax.sgd(0.0))
    state = step.create_train_state(variables, tx, tgd)
    _, metrics = step.train_step(state, _batch(), model=model, tx=tx, gate_cosine=True)

    def grad_of(m, gates):
        def loss(p):
            v = {"params": p, "batch_stats": variables["batch_stats"], **gates}
            with running_statistics(flat_paths(tgd.frozen_bn)):
                y, _ = m.apply(v, _batch()["inputs"], train=True, mutable=["batch_stats"])
            return jnp.mean((y - _batch()["targets"]) ** 2)
        return jax.grad(loss)(params)

    gated = grad_of(model, {"tgd": tgd.gates})
    true = grad_of(DnCNN(features=TINY_FEATURES), {})  # the same net without any gate
    a = np.concatenate([g[m].ravel() for m, g in
                        zip(*_masked_pairs(tgd.mask, gated), strict=True)])
    b = np.concatenate([g[m].ravel() for m, g in
                        zip(*_masked_pairs(tgd.mask, true), strict=True)])
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert 0 < expected < 0.999  # the gates really change the gradient here
    np.testing.assert_allclose(float(metrics["gate_cosine"]), expected, rtol=1e-4)

    open_gates = tgd_plan(params, model.topology(), 0.5, mode="projected",
                          batch_stats=variables["batch_stats"])
    state = step.create_train_state(variables, tx, open_gates)
    _, metrics = step.train_step(state, _batch(), model=model, tx=tx, gate_cosine=True)
    np.testing.assert_allclose(float(metrics["gate_cosine"]), 1.0, rtol=1e-5)


def _masked_pairs(mask, grads):
    ms, gs = [], []
    for m, g in zip(jax.tree.leaves(mask, is_leaf=lambda x: x is None), jax.tree.leaves(grads),
                    strict=True):
        if m is not None:
            ms.append(np.broadcast_to(np.asarray(m), g.shape))
            gs.append(np.asarray(g))
    return ms, gs


def test_frozen_bn_running_equals_inference_normalisation(tiny_dncnn):
    model, variables = tiny_dncnn
    # give the running statistics values unlike any batch's
    stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    v = {"params": variables["params"], "batch_stats": stats}
    x = _batch()["inputs"]
    everything = masks.running_norms(model.topology(), {
        f"conv{i}": np.zeros(w, bool) for i, w in enumerate(TINY_FEATURES, start=1)})
    assert sorted(everything) == ["bn2", "bn3", "bn4"]
    inference = model.apply(v, x, train=False)
    with running_statistics(everything):
        trained, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(trained, inference, rtol=1e-5, atol=1e-6)
    batch_mode, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert np.max(np.abs(batch_mode - inference)) > 1e-3  # the flag made the difference


def test_second_tgd_round_swaps_optax_mask_gates_and_bn_freeze_together(tiny_dncnn):
    model, variables = tiny_dncnn
    topo = model.topology()
    first = tgd_plan(variables["params"], topo, 0.4, mode="paper",
                     batch_stats=variables["batch_stats"])
    tx = first.optimizer(optax.adam(1e-2))
    fn = jax.jit(lambda s, b: step.train_step(s, b, model=model, tx=tx))
    state = step.create_train_state(variables, tx, first)
    for i in range(3):
        state, _ = fn(state, _batch(i))
    second = tgd_plan(state.params, topo, 0.6, mode="paper",  # fresh KSE, new phi
                      batch_stats=state.batch_stats)
    assert any(bool(jnp.any(first.channels[k] != second.channels[k])) for k in first.channels)
    state = step.replace_plan(state, second, tx)
    before = jax.device_get(state)
    for i in range(3, 6):
        state, _ = fn(state, _batch(i))
    assert fn._cache_size() == 1  # same structures: no recompilation
    for fb, fa, _, _ in frozen_and_retrained(second.mask, before.params, state.params):
        assert fb.tobytes() == fa.tobytes()
    np.testing.assert_equal(jax.device_get(state.gates), jax.device_get(second.gates))
    for i in range(2, len(TINY_FEATURES)):  # BN statistics follow the NEW mask
        frozen = ~np.asarray(second.channels[f"conv{i}"])
        for name in ("mean", "var"):
            old = np.asarray(before.batch_stats[f"bn{i}"][name])[frozen]
            np.testing.assert_array_equal(old, np.asarray(state.batch_stats[f"bn{i}"][name])[
                frozen])
    with pytest.raises(ValueError, match="different tree structure"):
        step.replace_plan(state, dataclasses.replace(second, gates={}), tx)


# --- fine-tuning with held-out new- and old-task sets ------------------------------------


@pytest.mark.parametrize("frozen_bn, mode", [("batch", "paper"), ("running", "projected")])
def test_finetune_logs_new_and_old_task_losses_and_the_cosine(toy_data, pretrained, tmp_path,
                                                              frozen_bn, mode):
    c = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "validation.path": str(toy_data["train"]), "validation.version": "v2",
        "old_task.path": str(toy_data["train"]), "old_task.version": "v1",
        "tgd.gate_cosine": True, "tgd.frozen_bn": frozen_bn, "tgd.phi": 0.5, "tgd.mode": mode})
    lines: list[str] = []
    summary = pipeline.finetune(c, tmp_path, log=lines.append)
    reach = json.loads((tmp_path / "mask.json").read_text()).get("paper_reach")
    said = [line for line in lines if "reached by the gradient" in line]
    if mode == "paper":  # the log says how much of the retrained part the gates let move
        assert said and all(f"{reach['params_reached']:,} of them" in line for line in said)
    else:
        assert reach is None and not said
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert all("val_loss_old" in r for r in val)
    assert summary["initial_val_loss_old"] == val[0]["val_loss_old"]
    assert summary["final_val_loss_old"] == val[-1]["val_loss_old"]
    cos = [r["gate_cosine"] for r in records if "gate_cosine" in r]
    assert cos and all(-1 <= v <= 1 + 1e-6 for v in cos)
    if mode == "projected":
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    assert summary["frozen_bn"] == frozen_bn
    assert summary["initial_val_loss_old"] != summary["initial_val_loss"]  # v1 vs v2 images
    if frozen_bn == "batch":  # a rerun of the finished run keeps the step-0 losses
        again = pipeline.finetune(c, tmp_path, log=quiet)
        for key in ("initial_val_loss", "initial_val_loss_old"):
            assert again[key] == summary[key] is not None
    params, stats, config = checkpoints.load(pretrained)
    mask = json.loads((tmp_path / "mask.json").read_text())["channels"]
    final, final_stats, _, _ = checkpoints.restore(tmp_path, "latest")
    for i in range(2, len(config.model.features)):
        frozen = ~np.asarray(mask[f"conv{i}"], bool)
        np.testing.assert_array_equal(np.asarray(stats[f"bn{i}"]["mean"])[frozen],
                                      np.asarray(final_stats[f"bn{i}"]["mean"])[frozen])
        assert np.asarray(params[f"conv{i}"]["kernel"])[..., frozen].tobytes() == \
            np.asarray(final[f"conv{i}"]["kernel"])[..., frozen].tobytes()


def test_last_layer_policy_reaches_the_plan(tiny_dncnn):
    from tgd_jax import methods

    model, variables = tiny_dncnn
    last = f"conv{len(TINY_FEATURES)}"
    for policy, expected in (("frozen", False), ("train", True)):
        plan = methods.plan_finetune("tgd", variables["params"], model.topology(), phi=0.3,
                                     last=policy, batch_stats=variables["batch_stats"])
        assert bool(np.all(np.asarray(plan.channels[last]) == expected))
        assert plan.summary["last"] == policy


def test_a_bad_held_out_count_is_named(toy_data, pretrained, tmp_path):
    c = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "validation.path": str(toy_data["train"]), "validation.studies": 0})
    with pytest.raises(ValueError, match="config.validation.studies must be finite and > 0, got 0"):
        pipeline.finetune(c, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched


@pytest.mark.parametrize("cpu_max, cap", [("150000 100000\n", 2), ("50000 100000", 1),
                                          ("max 100000", None), (None, None)])
def test_usable_cores_follow_the_affinity_mask_and_a_cgroup_quota(tmp_path, cpu_max, cap):
    import os
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    mask = len(os.sched_getaffinity(0))
    assert parallel.usable_cores(path) == (mask if cap is None else min(mask, cap))


CORES_SCRIPT = (
    "import jax\n"
    "from tgd_jax.train import parallel\n"
    "try:\n"
    "    n = parallel.use_cpu_cores(16, None)\n"
    "except ValueError as e:\n"
    "    print('ERROR', e)\n"
    "else:\n"
    "    print('DEVICES', n, jax.device_count())\n")


@pytest.mark.parametrize("env, cores, expected", [
    ("2", 1, "DEVICES 2 2"),  # asked for: 2 devices even on 1 core
    ("1", 2, "DEVICES 1 1"),
    ("", 1, "DEVICES 1 1"),  # the default: one per core this process may run on
    ("", 2, "DEVICES 2 2"),
    ("two", 2, "ERROR $TGD_CPU_DEVICES='two' is not an integer")])
def test_use_cpu_cores_sets_the_device_count_before_jax_starts(env, cores, expected):
    import os
    import subprocess
    import sys
    from pathlib import Path

    allowed = set(sorted(os.sched_getaffinity(0))[:cores])
    if len(allowed) < cores:
        pytest.skip(f"needs {cores} cores")
    clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    clean.update(JAX_PLATFORMS="cpu", TGD_CPU_DEVICES=env,
                 PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with pinned(allowed):
        out = subprocess.run([sys.executable, "-c", CORES_SCRIPT], capture_output=True,
                             text=True, env=clean, timeout=120)
    assert expected in out.stdout, out.stdout + out.stderr[-2000:]
