"""TGD on any ConvNet: after several AdamW steps (decoupled decay + coupled L2) in training
mode, every frozen element, parameters AND running statistics, is bit-identical and the
retrained ones moved; for the runtime's step (both modes) and for hand-written loops
(Linen, NNX with nnx.Optimizer, plain JAX)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from test_trace import LINEN, NNXNet, _lax_params, _linen, lax_net

import tgd_jax
from tgd_jax.graph import flat_paths
from tgd_jax.train import step as step_lib

OPTIMIZER = dict(name="adamw", learning_rate=1e-2, weight_decay=0.1, l2=1e-2, num_steps=5)


def _flat_masked(mask, tree):
    """(frozen values, retrained values) per leaf, by path."""
    m, t = flat_paths(mask, none_leaves=True), flat_paths(tree)
    for path, value in t.items():
        keep = np.zeros(np.shape(value), bool) if m[path] is None else np.broadcast_to(
            np.asarray(m[path]), np.shape(value))
        yield path, np.asarray(value)[~keep], np.asarray(value)[keep]


def check_frozen_and_moved(mask, before, after):
    moved = 0
    for (path, fb, rb), (_, fa, ra) in zip(_flat_masked(mask, before),
                                           _flat_masked(mask, after), strict=True):
        assert fb.tobytes() == fa.tobytes(), f"frozen elements of '{path}' changed"
        moved += int(np.sum(rb != ra))
    return moved


def _targets(model_out):
    return jax.random.normal(jax.random.key(9), model_out.shape)


@pytest.mark.parametrize("mode", ["projected", "paper"])
@pytest.mark.parametrize("family", sorted(LINEN))
def test_runtime_step_keeps_frozen_params_and_statistics(family, mode):
    model = LINEN[family]()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    stats = variables.get("batch_stats")
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5, mode=mode, batch_stats=stats)
    assert plan.auto_gates == (mode == "paper")
    tx = plan.optimizer(**OPTIMIZER)
    state = step_lib.create_train_state(variables, tx, plan)
    batch = {"inputs": x, "targets": _targets(model.apply(variables, x))}
    fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   graph=plan.graph if plan.auto_gates else None))
    for _ in range(4):
        state, metrics = fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = check_frozen_and_moved(plan.mask, variables["params"], state.params)
    assert moved > 0.5 * plan.summary["params_retrained"]
    if stats:
        moved_stats = check_frozen_and_moved(plan.stats_mask, stats, state.batch_stats)
        retrained_stats = any(np.any(m) for m in jax.tree.leaves(plan.stats_mask))
        assert (moved_stats > 0) == retrained_stats
    frozen = sum(not np.all(np.asarray(v)) for v in jax.tree.leaves(plan.channels))
    assert frozen > 0, "the test needs frozen channels"


def test_tied_channels_share_one_decision():
    model = LINEN["residual"]()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5)
    (group,) = graph.groups
    decisions = {tuple(np.asarray(plan.channels[path]).tolist()) for path in group}
    assert len(decisions) == 1  # stem, block0 and block1 write one stream: one decision


class WithScalar(nn.Module):
    """A parameter of no channel: a learned global scale of the output."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
        h = nn.Conv(3, (3, 3), name="b")(h)
        return h * self.param("gain", nn.initializers.ones, ())


@pytest.mark.parametrize("other", ["frozen", "train"])
def test_parameters_of_no_channel_follow_the_other_policy(other):
    model = WithScalar()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x)
    assert graph.other == ("params/gain",)
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5, other=other)
    assert plan.summary["other"] == {"leaves": ["gain"], "params_total": 1,
                                     "params_retrained": int(other == "train"),
                                     "policy": other}
    tx = plan.optimizer(optax.sgd(0.1))
    grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    assert (float(updates["gain"]) != 0.0) == (other == "train")


def test_own_linen_loop_with_the_documented_lines():
    """The README's lines for a loop of your own: keep_frozen for the statistics."""
    model = LINEN["unet"]()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    plan = tgd_jax.tgd_plan(params, graph, 0.5, batch_stats=stats, frozen_bn="batch")
    tx = plan.optimizer(**OPTIMIZER)
    opt_state = tx.init(params)
    y = _targets(model.apply(variables, x))

    @jax.jit
    def step(params, stats, opt_state):
        def loss(p):
            out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), new["batch_stats"]
        (_, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_stats = tgd_jax.keep_frozen(stats, new_stats, plan.stats_mask)
        return optax.apply_updates(params, updates), new_stats, opt_state

    p, s, o = params, stats, opt_state
    for _ in range(4):
        p, s, o = step(p, s, o)
    assert check_frozen_and_moved(plan.mask, params, p) > 0
    assert check_frozen_and_moved(plan.stats_mask, stats, s) > 0


def test_own_nnx_loop_with_nnx_optimizer():
    model = NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    model.eval()
    graphdef, state = nnx.split(model)
    graph = tgd_jax.trace_topology(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    before_params, before_stats = jax.tree.map(np.asarray, (params, stats))
    plan = tgd_jax.tgd_plan(params, graph, 0.9, batch_stats=stats, frozen_bn="batch")
    assert any(np.asarray(c).any() and not np.asarray(c).all() for c in plan.channels.values())
    assert isinstance(plan.mask, nnx.State)  # it mirrors the params, as nnx.Optimizer needs
    optimizer = nnx.Optimizer(model, plan.optimizer(**OPTIMIZER), wrt=nnx.Param)
    y = _targets(model(x))  # (in eval mode: a training-mode call would move the statistics)
    model.train()

    @nnx.jit
    def step(model, optimizer):
        old = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))  # a copy: the state
        # nnx.state returns follows the model's variables
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        try:
            optimizer.update(model, grads)
        except TypeError:  # flax < 0.11: update(grads)
            optimizer.update(grads)
        new = nnx.state(model, nnx.BatchStat)
        nnx.update(model, tgd_jax.keep_frozen(old, new, plan.stats_mask))

    for _ in range(4):
        step(model, optimizer)
    assert check_frozen_and_moved(plan.mask, before_params, nnx.state(model, nnx.Param)) > 0
    assert check_frozen_and_moved(plan.stats_mask, before_stats,
                                  nnx.state(model, nnx.BatchStat)) > 0


def test_own_lax_loop_paper_mode():
    params, x = _lax_params(), jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    graph = tgd_jax.trace_topology(lax_net, params, x)
    plan = tgd_jax.tgd_plan(params, graph, 0.6, mode="paper")
    apply = tgd_jax.gated(lax_net, plan)
    tx = plan.optimizer(**OPTIMIZER)
    y = _targets(lax_net(params, x))
    p, o = params, tx.init(params)
    for _ in range(4):
        grads = jax.grad(lambda q: jnp.mean((apply(q, x) - y) ** 2))(p)
        updates, o = tx.update(grads, o, p)
        p = optax.apply_updates(p, updates)
    assert check_frozen_and_moved(plan.mask, params, p) > 0


@pytest.mark.parametrize("through_gates", [True, False], ids=["gated", "plain-apply"])
def test_paper_mode_says_when_the_training_pass_skipped_its_gates(through_gates):
    import warnings

    from tgd_jax.errors import TGDWarning

    params, x = _lax_params(), jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    graph = tgd_jax.trace_topology(lax_net, params, x)
    plan = tgd_jax.tgd_plan(params, graph, 0.6, mode="paper")
    apply = tgd_jax.gated(lax_net, plan) if through_gates else lax_net
    tx = plan.optimizer(optax.adam(1e-2))
    y = _targets(lax_net(params, x))

    @jax.jit
    def step(p, o):
        grads = jax.grad(lambda q: jnp.mean((apply(q, x) - y) ** 2))(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        p, o = step(params, tx.init(params))
        jax.block_until_ready(p)
        jax.effects_barrier()
    ungated = [w for w in said if issubclass(w.category, TGDWarning)
               and "did not pass the gates" in str(w.message)]
    assert len(ungated) == (0 if through_gates else 1), [str(w.message) for w in said]
    assert check_frozen_and_moved(plan.mask, params, p) > 0  # the mask holds either way


def test_names_the_plan_refers_to_are_checked():
    from tgd_jax.pet.models import DnCNN
    from tgd_jax.topology import dncnn_topology, sequential_topology

    model = DnCNN(features=(6, 5, 3), use_gates=True)
    variables, x = _linen(model)
    params, stats = variables["params"], variables["batch_stats"]
    # a misspelled gate: the plan would gate nothing there
    wrong = sequential_topology(["conv1", "conv2", "conv3"], norms={"conv2": "bn2"},
                                gates={"conv1": ["gate_conv1"], "conv2": ["gate_convv2"]})
    plan = tgd_jax.tgd_plan(params, wrong, 0.5, mode="paper", batch_stats=stats)
    with pytest.raises(ValueError, match="gates do not match the model's gate modules"):
        step_lib.create_train_state(variables, plan.optimizer(optax.adam(1e-3)), plan)
    good = tgd_jax.tgd_plan(params, dncnn_topology(3), 0.5, mode="paper", batch_stats=stats)
    step_lib.create_train_state(variables, good.optimizer(optax.adam(1e-3)), good)
    # a graph traced from another network
    other = tgd_jax.trace_topology(DnCNN(features=(6, 4, 3)).apply,
                                   *_linen(DnCNN(features=(6, 4, 3))), train=False)
    with pytest.raises(ValueError, match=r"'conv2/kernel' has shape \(3, 3, 6, 5\), but the graph"):
        tgd_jax.tgd_plan(params, other, 0.5, batch_stats=stats)
    with pytest.raises(ValueError, match="BatchNorm 'bnx', not found in params or batch_stats"):
        tgd_jax.tgd_plan(params, sequential_topology(["conv1", "conv2", "conv3"],
                                                     norms={"conv2": "bnx"}), 0.5,
                         batch_stats=stats)


class CustomNorm(nn.Module):
    """A normalisation of its own with running statistics: not a flax.linen.BatchNorm."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Conv(4, (3, 3), use_bias=False, name="a")(x)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (4,))
        if train and not self.is_initializing():
            mean.value = 0.9 * mean.value + 0.1 * h.mean(axis=(0, 1, 2))
        return nn.Conv(3, (3, 3), name="b")(nn.relu(h - mean.value))


def test_running_statistics_are_refused_for_a_norm_it_cannot_reach():
    model = CustomNorm()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x)
    assert "batch_stats/mean" in graph.leaves
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.9,
                            batch_stats=variables["batch_stats"])  # frozen_bn="running"
    tx = plan.optimizer(optax.adam(1e-3))
    state = step_lib.create_train_state(variables, tx, plan)
    batch = {"inputs": x, "targets": x}
    with pytest.raises(ValueError, match="never called as flax.linen.BatchNorm"):
        step_lib.train_step(state, batch, model=model, tx=tx)
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.9, frozen_bn="batch",
                            batch_stats=variables["batch_stats"])
    tx = plan.optimizer(optax.adam(1e-3))
    state = step_lib.create_train_state(variables, tx, plan)
    step_lib.train_step(state, batch, model=model, tx=tx)  # batch statistics: it runs


class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Conv(6, (3, 3), name="a")(x))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Conv(3, (3, 3), name="b")(h)


def test_train_step_gives_dropout_its_keys():
    model = WithDropout()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x)  # Dropout: no channel mixing
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.9)
    tx = plan.optimizer(optax.sgd(0.1))
    state = step_lib.create_train_state(variables, tx, plan)
    batch = {"inputs": x, "targets": x}
    losses = {}
    for seed in (0, 0, 1):
        fn = functools.partial(step_lib.train_step, model=model, tx=tx, dropout_seed=seed)
        _, metrics = fn(state, batch)  # it raised "needs PRNG for 'dropout'" before
        losses.setdefault(seed, []).append(float(metrics["loss"]))
    assert losses[0][0] == losses[0][1] != losses[1][0]  # a function of (seed, step)


# --- silent mistakes: each one line, refused or warned -------------------------------------


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Conv(1, (3, 3))(x)


def _bn_net():
    model, x = _BNNet(), jnp.zeros((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x, tgd_jax.trace_topology(model.apply, variables, x)


def test_a_batchnorm_plan_without_its_statistics_is_warned_about():
    from tgd_jax.errors import TGDWarning

    _, variables, _, graph = _bn_net()
    with pytest.warns(TGDWarning, match=r"1 BatchNorm layer\(s\) .* pass batch_stats="):
        plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5)
    assert plan.stats_mask is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TGDWarning)  # given: no warning
        plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5,
                                batch_stats=variables["batch_stats"])
    assert plan.stats_mask is not None


def test_a_hand_topology_plan_without_its_statistics_is_warned_about(tiny_dncnn):
    """The hand topology names its BatchNorms, so it is warned about as a traced graph is
    (the conversion records Flax's statistics by name without batch_stats=)."""
    from tgd_jax.errors import TGDWarning

    model, variables = tiny_dncnn
    with pytest.warns(TGDWarning, match=r"3 BatchNorm layer\(s\) .* pass batch_stats="):
        plan = tgd_jax.tgd_plan(variables["params"], model.topology(), 0.5)
    assert plan.stats_mask is None and set(plan.frozen_bn) == {"bn2", "bn3", "bn4"}


def test_a_threshold_that_retrains_nothing_is_warned_about():
    from tgd_jax.errors import TGDWarning

    _, variables, _, graph = _bn_net()
    with pytest.warns(TGDWarning, match=r"phi=0.0 retrains nothing"):
        plan = tgd_jax.tgd_plan(variables["params"], graph, 0.0,
                                batch_stats=variables["batch_stats"])
    assert plan.summary["params_retrained"] == 0


def test_tracing_a_training_mode_call_is_refused():
    model, variables, x, inference = _bn_net()
    with pytest.raises(tgd_jax.TraceError,
                       match=r"mutable=\['batch_stats'\] makes the call return"):
        tgd_jax.trace_topology(model.apply, variables, x, train=True, mutable=["batch_stats"])
    assert inference.layers  # the inference call traces


class _Skip(nn.Module):
    """a -> b -> c, and a skip from a into d, then a one-channel output (tanh: a gradient
    is exactly zero only where a gate stops it)."""

    @nn.compact
    def __call__(self, x):
        a = jnp.tanh(nn.Conv(4, (3, 3), name="a")(x))
        b = jnp.tanh(nn.Conv(4, (3, 3), name="b")(a))
        c = jnp.tanh(nn.Conv(4, (3, 3), name="c")(b))
        d = jnp.tanh(nn.Conv(4, (3, 3), name="d")(jnp.concatenate([a, c], -1)))
        return nn.Conv(1, (3, 3), name="out")(d)


@pytest.mark.parametrize("decisions", [
    {"a": [1, 0, 1, 0], "b": [0, 1, 1, 0], "c": [0, 0, 0, 0], "d": [1, 0, 0, 0]},  # b cut
    {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0], "c": [0, 1, 0, 0], "d": [0, 0, 0, 0]},  # all cut
    {"a": [0, 1, 0, 1], "b": [1, 0, 0, 1], "c": [1, 0, 1, 0], "d": [0, 1, 1, 0]},  # none
], ids=["b-cut", "d-frozen", "all-reached"])
def test_paper_mode_gradient_reach_is_what_the_gated_backward_pass_reaches(decisions):
    import dataclasses

    from tgd_jax import masks as masks_lib

    model, x = _Skip(), jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    graph = tgd_jax.trace_topology(model.apply, variables, x)
    channels = {k: jnp.asarray(v, bool) for k, v in decisions.items()} | {
        "out": jnp.zeros(1, bool)}
    mask = masks_lib.expand_channel_masks(params, graph, channels)
    predicted = masks_lib.reached_count(params, mask, graph,
                                        masks_lib.gradient_reach(graph, channels))
    # Independent truth: the gated backward pass itself; a retrained element is reached
    # when its gradient is not zero for some input.
    plan = dataclasses.replace(tgd_jax.tgd_plan(params, graph, 0.5, mode="paper"),
                               channels=channels, mask=mask)
    apply = tgd_jax.gated(model.apply, plan)
    seen = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)
    for key in (1, 2):
        batch = jax.random.normal(jax.random.key(key), (4, 8, 8, 1))
        grads = jax.grad(lambda p, b=batch: jnp.sum(apply({"params": p}, b) ** 2))(params)
        seen = jax.tree.map(lambda s, g: s | (g != 0), seen, grads)
    measured = sum(int(np.sum(np.broadcast_to(m, s.shape) & s))
                   for m, s in zip(jax.tree.leaves(mask, is_leaf=lambda v: v is None),
                                   jax.tree.leaves(seen), strict=True) if m is not None)
    retrained = sum(int(np.sum(np.broadcast_to(m, p.shape)))
                    for m, p in zip(jax.tree.leaves(mask, is_leaf=lambda v: v is None),
                                    jax.tree.leaves(params), strict=True) if m is not None)
    assert predicted == measured
    assert (predicted < retrained) == (decisions["c"] != [1, 0, 1, 0])  # the cut cases


@pytest.mark.parametrize("family, warned", [("residual", True), ("unet", False)])
def test_paper_mode_warns_when_most_retrained_parameters_cannot_move(family, warned):
    # residual: each block's last conv is frozen, so the gates cut every retrained map (0 of
    # 94, checked against the gated pass below); unet: every retrained map is reached
    import warnings

    from tgd_jax.errors import TGDWarning

    model = LINEN[family]()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TGDWarning)
        plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5, mode="paper",
                                batch_stats=variables.get("batch_stats"))
    reach = plan.summary["paper_reach"]
    assert reach["params_retrained"] == plan.summary["params_retrained"] > 0
    cut = [w for w in caught if "can receive a gradient" in str(w.message)]
    assert bool(cut) == warned
    if warned:
        assert f"only {reach['params_reached']:,} of the" in str(cut[0].message)
        assert cut[0].filename == __file__  # it points at the caller's line
    projected = tgd_jax.tgd_plan(variables["params"], graph, 0.5,
                                 batch_stats=variables.get("batch_stats"))
    assert "paper_reach" not in projected.summary  # no gates, nothing cut


@pytest.mark.parametrize("family", ["residual", "setup-nested", "unet", "separable",
                                    "groupnorm"])
def test_paper_reach_on_residual_streams_and_skips_is_what_the_gated_pass_reaches(family):
    # Independent truth on the test families with adds and skips: the gated backward pass.
    import warnings

    from tgd_jax.errors import TGDWarning

    model = LINEN[family]()
    variables, x = _linen(model)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TGDWarning)
        plan = tgd_jax.tgd_plan(variables["params"], graph, 0.5, mode="paper",
                                batch_stats=variables.get("batch_stats"))
    apply = tgd_jax.gated(model.apply, plan)
    params = variables["params"]
    seen = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)

    def out(p, b):
        if "batch_stats" not in variables:
            return apply({"params": p}, b)
        # training mode: batch statistics keep a freshly initialised network alive (in
        # inference mode this UNet's decoder is all zeros, and every gradient with it)
        return apply({**variables, "params": p}, b, train=True, mutable=["batch_stats"])[0]

    for key in (1, 2):
        batch = jax.random.normal(jax.random.key(key), x.shape)
        grads = jax.grad(lambda p, b=batch: jnp.sum(out(p, b) ** 2))(params)
        seen = jax.tree.map(lambda s, g: s | (g != 0), seen, grads)
    measured = sum(int(np.sum(np.broadcast_to(m, s.shape) & s))
                   for m, s in zip(jax.tree.leaves(plan.mask, is_leaf=lambda v: v is None),
                                   jax.tree.leaves(seen), strict=True) if m is not None)
    reach = plan.summary["paper_reach"]
    # The gates never let more through than the graph says (the count is an upper bound);
    # a few elements the gates pass may still get no gradient (a transposed conv's taps
    # that no input reaches, a unit dead for these batches). In the residual families the
    # gates cut everything: the frozen last conv of each block stops the stream's branch.
    assert measured <= reach["params_reached"] <= measured + 0.02 * reach["params_retrained"]
