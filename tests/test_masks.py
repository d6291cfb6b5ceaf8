"""Mask pytrees from params: the TGD rule against the brute-force KSE, policies, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OTHER_TOPOLOGY_ARGS, OtherNet, reference_kse

from tgd_jax import masks
from tgd_jax.methods import tgd_plan
from tgd_jax.pet.models import DnCNN
from tgd_jax.topology import (
    ConvNode,
    dncnn_topology,
    get_path,
    sequential_topology,
    validate_topology,
)

# These tests plan masks and gates only; the warning about a BatchNorm plan made without
# batch_stats= has its own tests (test_any_convnet.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:the network has .* BatchNorm layer:tgd_jax.errors.TGDWarning")


@pytest.fixture(scope="module")
def other():
    model = OtherNet()
    variables = model.init(jax.random.key(1), jnp.zeros((2, 8, 8, 3)))
    return model, variables, sequential_topology(**OTHER_TOPOLOGY_ARGS)


def _expected_channels(params, topology, phi, first="kse"):
    """The rule written out with the independent NumPy KSE."""
    expected = {}
    for i, node in enumerate(topology):
        c_out = get_path(params, node.conv + "/kernel").shape[-1]
        if node.consumer is None or (i == 0 and first == "frozen"):
            expected[node.conv] = np.zeros(c_out, bool)
        elif i == 0 and first == "train":
            expected[node.conv] = np.ones(c_out, bool)
        else:
            score = reference_kse(get_path(params, node.consumer + "/kernel"))[3]
            expected[node.conv] = score < phi
    return expected


@pytest.mark.parametrize("phi", [0.3, 0.6])
@pytest.mark.parametrize("first", ["kse", "frozen", "train"])
def test_dncnn_rule_matches_reference(tiny_dncnn, phi, first):
    model, variables = tiny_dncnn
    params, topology = variables["params"], model.topology()
    result = tgd_plan(params, topology, phi, first=first)
    expected = _expected_channels(params, topology, phi, first)
    for node in topology:
        channel = expected[node.conv]
        np.testing.assert_array_equal(result.channels[node.conv], channel)
        m = result.mask[node.conv]
        assert m["kernel"].shape == (1, 1, 1, channel.size)
        np.testing.assert_array_equal(m["kernel"].reshape(-1), channel)
        assert ("bias" in m) == (node.norm is None)  # a conv before a BatchNorm has none
        if "bias" in m:
            np.testing.assert_array_equal(m["bias"], channel)
        if node.norm is not None:
            np.testing.assert_array_equal(result.mask[node.norm]["scale"], channel)
            np.testing.assert_array_equal(result.mask[node.norm]["bias"], channel)
    # The last conv (noise classifier) is frozen by default.
    assert not np.any(result.channels["conv5"])
    # Non-vacuous: some middle layer has both retrained and frozen channels.
    assert any(0 < np.sum(result.channels[f"conv{i}"]) < len(result.channels[f"conv{i}"])
               for i in (2, 3, 4))


def test_scores_rate_output_channels_with_consumer_kernel(tiny_dncnn):
    model, variables = tiny_dncnn
    params = variables["params"]
    scores = masks.layer_scores(params, model.topology())
    assert set(scores) == {"conv1", "conv2", "conv3", "conv4"}  # conv5 has no consumer
    # Every layer (they are computed on a thread pool, largest first): each against the
    # paper's loops on its reader's kernel.
    for i in range(1, 5):
        np.testing.assert_allclose(
            scores[f"conv{i}"], reference_kse(params[f"conv{i + 1}"]["kernel"])[3], atol=1e-5,
            err_msg=f"conv{i}")


def test_other_convnet(other):
    _, variables, topology = other
    params = variables["params"]
    validate_topology(params, topology)
    result = tgd_plan(params, topology, 0.5)
    expected = _expected_channels(params, topology, 0.5)
    for name, channel in expected.items():
        np.testing.assert_array_equal(result.channels[name], channel)
    enc = result.mask["encoder"]
    np.testing.assert_array_equal(enc["conv_a"]["kernel"].reshape(-1), expected["encoder/conv_a"])
    assert "bias" not in enc["conv_a"]  # the bias-free conv has no bias leaf to mask
    np.testing.assert_array_equal(enc["norm_a"]["scale"], expected["encoder/conv_a"])
    # The dense head is untouched by the rule: None, which means frozen.
    assert result.mask["head"] == {"kernel": None, "bias": None}
    assert jax.tree.structure(result.mask, is_leaf=lambda x: x is None) == jax.tree.structure(
        jax.tree.map(lambda _: None, params), is_leaf=lambda x: x is None
    )


def test_dncnn_topology_wiring():
    topology = dncnn_topology(8)
    assert [n.conv for n in topology] == [f"conv{i}" for i in range(1, 9)]
    assert [n.consumer for n in topology] == [f"conv{i}" for i in range(2, 9)] + [None]
    assert [n.norm for n in topology] == [None] + [f"bn{i}" for i in range(2, 8)] + [None]
    assert topology[0].gates == ("gate_conv1",)
    assert topology[3].gates == ("gate_conv4", "gate_bn4")
    assert topology[-1].gates == ()


@pytest.mark.parametrize("phi", [-0.1, 1.01, float("nan")])
def test_phi_out_of_range(tiny_dncnn, phi):
    model, variables = tiny_dncnn
    with pytest.raises(ValueError, match=r"phi=\S+ must be in \[0, 1\]"):
        tgd_plan(variables["params"], model.topology(), phi)


def test_topology_naming_missing_layer(tiny_dncnn):
    _, variables = tiny_dncnn
    topology = sequential_topology(["conv1", "conv2", "conv9"])
    with pytest.raises(ValueError, match="'conv9'"):
        tgd_plan(variables["params"], topology, 0.3)
    with pytest.raises(ValueError, match="BatchNorm 'bn7'"):
        validate_topology(
            variables["params"], sequential_topology(["conv1", "conv2"], norms={"conv1": "bn7"})
        )


def test_topology_with_channel_mismatch(tiny_dncnn):
    _, variables = tiny_dncnn
    # conv2 (8 outputs) does not feed conv4 (reads 12 channels).
    with pytest.raises(ValueError, match="'conv2' has 8 output channels.*'conv4' reads 12"):
        tgd_plan(variables["params"], sequential_topology(["conv2", "conv4"]), 0.3)


def test_bad_policies_and_shapes(tiny_dncnn):
    model, variables = tiny_dncnn
    params, topology = variables["params"], model.topology()
    with pytest.raises(ValueError, match="first=.sometimes. must be one of"):
        tgd_plan(params, topology, 0.3, first="sometimes")
    channels = tgd_plan(params, topology, 0.3).channels
    with pytest.raises(ValueError, match="channel mask for 'conv2' has shape"):
        masks.expand_channel_masks(params, topology, {**channels, "conv2": np.ones(3, bool)})
    bad = masks.expand_channel_masks(params, topology, channels)
    bad["conv3"]["kernel"] = jnp.ones((1, 1, 1, 5), bool)
    with pytest.raises(ValueError, match="'conv3/kernel' has shape"):
        masks.mask_summary(params, bad, topology)
    with pytest.raises(ValueError, match="TGD mode"):
        masks.gate_variables(topology, channels, mode="both")


def test_summary_counts_and_json(tiny_dncnn):
    model, variables = tiny_dncnn
    params, topology = variables["params"], model.topology()
    result = tgd_plan(params, topology, 0.5)
    summary = masks.mask_summary(params, result.mask, topology, scores=result.scores, phi=0.5)
    json.dumps(summary)  # serialisable
    total_retrained = 0
    for entry, node in zip(summary["layers"], topology, strict=True):
        kernel = params[node.conv]["kernel"]
        n = int(np.sum(result.channels[node.conv]))
        bias = int("bias" in params[node.conv])
        per_channel = int(np.prod(kernel.shape[:-1])) + bias + (2 if node.norm else 0)
        assert entry["channels_retrained"] == n
        assert entry["params_retrained"] == n * per_channel
        assert entry["params_total"] == kernel.shape[-1] * per_channel
        total_retrained += n * per_channel
    total = sum(p.size for p in jax.tree.leaves(params))
    assert summary["params_total"] == total
    assert summary["params_retrained"] == total_retrained
    assert summary["retrained_fraction"] == pytest.approx(total_retrained / total)
    assert summary["layers"][1]["kse"] == pytest.approx(list(np.asarray(result.scores["conv2"])))


def test_drop_kernels_zeroes_useless_feature_maps(tiny_dncnn):
    model, variables = tiny_dncnn
    params, topology = variables["params"], model.topology()
    # Give BN non-trivial statistics/affine so that zeroing really matters.
    params = jax.tree.map(lambda p: p + 0.3, params)
    result = tgd_plan(params, topology, 0.5)
    dropped = masks.drop_kernels(params, result.mask)
    for path_mask, p, d in zip(
        jax.tree.leaves(result.mask), jax.tree.leaves(params), jax.tree.leaves(dropped),
        strict=True,
    ):
        m = np.broadcast_to(path_mask, p.shape)
        assert np.all(np.asarray(d)[m] == 0.0)
        np.testing.assert_array_equal(np.asarray(d)[~m], np.asarray(p)[~m])
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    _, state = model.apply(
        {**variables, "params": dropped}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    bn3_out = state["intermediates"]["bn3"]["__call__"][0]
    dropped_channels = np.asarray(result.channels["conv3"])
    assert dropped_channels.any() and not dropped_channels.all()
    assert np.all(np.asarray(bn3_out)[..., dropped_channels] == 0.0)
    assert np.any(np.asarray(bn3_out)[..., ~dropped_channels] != 0.0)


def test_statistics_mask_and_keep_frozen(tiny_dncnn):
    model, variables = tiny_dncnn
    result = tgd_plan(variables["params"], model.topology(), 0.5,
                      batch_stats=variables["batch_stats"])
    x = 3.0 + jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"], updated["batch_stats"]
    kept = masks.keep_frozen(old, new, result.stats_mask)
    for bn, conv in [("bn2", "conv2"), ("bn3", "conv3"), ("bn4", "conv4")]:
        channel = np.asarray(result.channels[conv])
        assert channel.any() and not channel.all(), "the test needs frozen and retrained"
        for stat in ("mean", "var"):
            np.testing.assert_array_equal(kept[bn][stat][~channel], old[bn][stat][~channel])
            np.testing.assert_array_equal(kept[bn][stat][channel], new[bn][stat][channel])
            assert np.all(np.asarray(new[bn][stat]) != np.asarray(old[bn][stat]))
    # A None leaf keeps the old value entirely.
    kept = masks.keep_frozen(old, new, jax.tree.map(lambda _: None, old))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)
    # With every channel in inference mode, no statistic may change.
    inference = tgd_plan(variables["params"], model.topology(), 0.5, retrained_bn="running",
                         batch_stats=variables["batch_stats"])
    assert not any(np.any(m) for m in jax.tree.leaves(inference.stats_mask))
    assert all(np.all(f) for f in inference.frozen_bn.values())


def test_sequential_topology_errors():
    with pytest.raises(ValueError, match="unique"):
        sequential_topology(["a", "a"])
    with pytest.raises(ValueError, match="not in the stack"):
        sequential_topology(["a", "b"], norms={"c": "bn"})
    assert sequential_topology(["a", "b"])[0] == ConvNode("a", "b", None, ())


def test_last_layer_policy_and_its_gate_stays_open(tiny_dncnn):
    _, variables = tiny_dncnn
    # A three-layer network: the tail of the tiny DnCNN.
    params = {k: variables["params"][k] for k in ("conv3", "conv4", "conv5", "bn3", "bn4")}
    topology = sequential_topology(
        ["conv3", "conv4", "conv5"], norms={"conv3": "bn3", "conv4": "bn4"},
        gates={"conv4": ["gate_conv4"], "conv5": ["gate_last"]},
    )
    frozen = tgd_plan(params, topology, 0.5, mode="paper")
    assert not np.any(frozen.channels["conv5"])
    # Masking the last layer's cotangent would stop every gradient: its gate stays open.
    np.testing.assert_array_equal(frozen.gates["gate_last"]["mask"], np.ones(3, bool))
    np.testing.assert_array_equal(frozen.gates["gate_conv4"]["mask"], frozen.channels["conv4"])
    trained = tgd_plan(params, topology, 0.5, last="train")
    assert np.all(trained.channels["conv5"]) and np.all(trained.mask["conv5"]["kernel"])
    projected = tgd_plan(params, topology, 0.5, mode="projected")
    assert projected.gates == {}  # no gated backward pass: the model needs no gates


def test_a_conv_left_out_of_the_topology_is_named(tiny_dncnn):
    # conv1 and conv2 both have 8 outputs: without conv2, conv1 -> conv3 matches in channel
    # counts, so only the check against the params' conv kernels can notice.
    model, variables = tiny_dncnn
    names = [node.conv for node in model.topology() if node.conv != "conv2"]
    with pytest.raises(ValueError, match=r"does not name: \['conv2'\]"):
        validate_topology(variables["params"], sequential_topology(names))


def test_paper_mode_needs_gates_in_the_topology(tiny_dncnn):
    model, variables = tiny_dncnn
    no_gates = sequential_topology([node.conv for node in model.topology()],
                                   norms={n.conv: n.norm for n in model.topology() if n.norm})
    with pytest.raises(ValueError, match="names no TGD gates"):
        tgd_plan(variables["params"], no_gates, 0.5, mode="paper")
    assert tgd_plan(variables["params"], no_gates, 0.5, mode="projected").gates == {}
    # A DnCNN built without gates says so: paper mode is refused, not run as projected.
    plain = DnCNN(features=model.features)
    assert not any(node.gates for node in plain.topology())
    with pytest.raises(ValueError, match="names no TGD gates"):
        tgd_plan(variables["params"], plain.topology(), 0.5, mode="paper")


@pytest.mark.parametrize("groups, per_in, c_out", [(2, 3, 6), (4, 1, 8)], ids=["grouped", "dw"])
def test_readers_retrain_exactly_the_grouped_kernel_elements_that_read_a_retrained_map(
        groups, per_in, c_out):
    # Truth from the conv itself: the kernel elements with a gradient when only input
    # channel c is non-zero are those that read c.
    from tgd_jax.graph import ChannelGraph, Layer

    c_in = per_in * groups
    kernel = jax.random.normal(jax.random.key(0), (3, 3, per_in, c_out))

    def reads_channel(c):
        x = jnp.zeros((1, 5, 5, c_in)).at[..., c].set(1.0)
        conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups).sum()
        return np.asarray(jax.grad(conv)(kernel) != 0)

    source = Layer("a", "a/kernel", 2, 3, "conv", (-1,), tuple(range(c_in)))
    grouped = Layer("g", "g/kernel", 2, 3, "conv", tuple(range(c_in)),
                    tuple(range(c_in, c_in + c_out)), groups=groups)
    graph = ChannelGraph((source, grouped), {}, frozenset(grouped.out_maps))
    params = {"a": {"kernel": jnp.ones((3, 3, 1, c_in))}, "g": {"kernel": kernel}}
    retrained = np.zeros(c_in, bool)
    retrained[[0, c_in - 1]] = True
    mask = masks.expand_channel_masks(
        params, graph, {"a": retrained, "g": np.zeros(c_out, bool)}, readers="all")
    want = np.zeros(kernel.shape, bool)
    for c in np.flatnonzero(retrained):
        want |= reads_channel(int(c))
    got = np.broadcast_to(np.asarray(mask["g"]["kernel"]), kernel.shape)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < want.size


def test_equal_width_layers_listed_out_of_order_are_warned_about():
    import warnings

    from tgd_jax.errors import TGDWarning
    from tgd_jax.topology import validate_topology

    def conv(c_in):
        return {"kernel": jnp.ones((3, 3, c_in, 4))}

    params = {"a1": conv(1), "a2": conv(4), "a3": conv(4), "a10": conv(4)}
    with pytest.warns(TGDWarning, match="'a3' feeding 'a2'"):  # shapes all agree
        validate_topology(params, sequential_topology(["a1", "a3", "a2", "a10"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_topology(params, sequential_topology(["a1", "a2", "a3", "a10"]))
        # a restored checkpoint may hold its keys sorted ('a10' before 'a2'): the names'
        # natural order still says forward, so nothing is said
        restored = {k: params[k] for k in sorted(params)}
        validate_topology(restored, sequential_topology(["a1", "a2", "a3", "a10"]))


def test_gradient_reach_through_a_grouped_reader_follows_the_groups():
    # a -> depthwise dw (2 groups of 1) -> b (the output). Retrained: a's map 0 and dw's
    # channel 1. dw's channel 0 is frozen, so its gate closes: map 0's only way to the
    # loss (dw's group 0) is cut, although dw's other output is reached.
    from tgd_jax.graph import ChannelGraph, Layer

    graph = ChannelGraph((Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0, 1)),
                          Layer("dw", "dw/kernel", 2, 3, "conv", (0, 1), (2, 3), groups=2),
                          Layer("b", "b/kernel", 2, 3, "conv", (2, 3), (4,))),
                         {}, frozenset({4}))
    channels = {"a": np.array([True, False]), "dw": np.array([False, True]),
                "b": np.array([False])}
    reached = masks.gradient_reach(graph, channels)
    assert reached == {0: False, 1: False, 2: False, 3: True, 4: True}


def test_a_hand_topology_converted_from_its_channel_masks_gives_the_graphs_variables(
        tiny_dncnn):
    """gate_variables, running_norms and statistics_mask convert a hand-written topology
    into the one graph type (channel counts from the masks when params are not given): the
    same trees as from the graph built with params, and gates that are the conv's channel
    mask (the last conv's open, since no layer reads it)."""
    from tgd_jax.errors import UsageError
    from tgd_jax.graph import as_graph, from_topology

    model, variables = tiny_dncnn
    topology = model.topology()
    stats = variables["batch_stats"]
    graph = from_topology(topology, variables["params"], stats)
    channels = tgd_plan(variables["params"], graph, 0.5, batch_stats=stats).channels

    def same(a, b):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)

    for mode in ("paper", "projected"):
        hand = masks.gate_variables(topology, channels, mode)
        same(hand, masks.gate_variables(graph, channels, mode))
        for node in topology:
            for gate in node.gates:
                open_ = mode == "projected" or node.consumer is None
                expected = np.ones_like(channels[node.conv]) if open_ else channels[node.conv]
                np.testing.assert_array_equal(get_path(hand, f"{gate}/mask"), expected)
    for frozen_bn, retrained_bn in (("running", "batch"), ("batch", "running")):
        hand = masks.running_norms(topology, channels, frozen_bn=frozen_bn,
                                   retrained_bn=retrained_bn)
        same(hand, masks.running_norms(graph, channels, frozen_bn=frozen_bn,
                                       retrained_bn=retrained_bn))
        assert set(hand) == {node.norm for node in topology if node.norm}
    running = masks.running_norms(graph, channels)
    same(masks.statistics_mask(stats, topology, channels, running),
         masks.statistics_mask(stats, graph, channels, running))
    with pytest.raises(UsageError, match="needs params"):
        as_graph(topology)
    with pytest.raises(UsageError, match=r"no mask for the topology's conv\(s\) \['conv2'\]"):
        masks.gate_variables(topology, {k: v for k, v in channels.items() if k != "conv2"})


def test_two_convs_feeding_one_consumer_are_refused_in_a_hand_topology():
    """A hand-written topology is a chain: an add of two producers would let one of them
    look unread (its gates open, its KSE never measured)."""
    from tgd_jax.errors import UsageError

    params = {n: {"kernel": jnp.zeros((1, 1, c_in, c_out))}
              for n, c_in, c_out in (("a", 1, 2), ("b", 1, 2), ("c", 2, 1))}
    topology = (ConvNode("a", consumer="c"), ConvNode("b", consumer="c"), ConvNode("c"))
    with pytest.raises(UsageError, match="'a' and 'b' both name 'c' as their consumer"):
        validate_topology(params, topology)
