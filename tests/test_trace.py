"""The traced channel graph against a ground truth found by running the network
(tests/channel_truth.py), for every model family; one refusal test per construct."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from channel_truth import OUTPUT, agree, lax_truth, linen_truth, nnx_truth
from flax import linen as nn
from flax import nnx

from tgd_jax import TraceError, trace_topology
from tgd_jax.errors import UsageError
from tgd_jax.graph import ChannelGraph, from_topology
from tgd_jax.pet.models import DnCNN, ResNetDenoiser, UNet

# --- models of every family ------------------------------------------------------------


class DenseNetish(nn.Module):
    """DenseNet-style concatenations (every map read by several convs) and a dense head on
    pooled features."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x0 = nn.relu(nn.Conv(4, (3, 3), name="c0")(x))
        x1 = nn.relu(nn.Conv(3, (3, 3), name="c1")(x0))
        x2 = nn.relu(nn.Conv(3, (3, 3), name="c2")(jnp.concatenate([x0, x1], -1)))
        x3 = nn.Conv(5, (1, 1), name="c3")(jnp.concatenate([x0, x1, x2], -1))
        pooled = nn.avg_pool(x3, (2, 2), strides=(2, 2))
        return nn.Dense(2, name="head")(pooled.mean(axis=(1, 2)))


class NNXNet(nnx.Module):
    """An NNX model: integer-keyed lists, BatchNorm, a residual stream, a slice."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.convs = nnx.List([nnx.Conv(6, 6, (3, 3), use_bias=False, rngs=rngs)
                               for _ in range(2)])
        self.norms = nnx.List([nnx.BatchNorm(6, rngs=rngs) for _ in range(2)])
        self.head = nnx.Conv(4, 3, (1, 1), rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = nnx.relu(h + norm(conv(h)))
        return self.head(h[..., 1:5])  # reads channels 1..4 of the stream only


def lax_net(params, x):
    """A plain function of a params dict: a map read twice by one conv, padding, a slice."""
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda h, w: jax.lax.conv_general_dilated(h, w, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=dn)
    a = jax.nn.relu(conv(x, params["w1"]))
    b = conv(jnp.concatenate([a, a], -1), params["w2"])  # a read at offsets 0 and 4
    c = jnp.pad(b, ((0, 0), (0, 0), (0, 0), (1, 0)))[..., :3]  # a zero channel, then b[:2]
    return conv(c, params["w3"]) + x


def _lax_params():
    keys = jax.random.split(jax.random.key(3), 3)
    return {"w1": jax.random.normal(keys[0], (3, 3, 2, 4)),
            "w2": jax.random.normal(keys[1], (3, 3, 8, 3)),
            "w3": jax.random.normal(keys[2], (3, 3, 3, 2))}


def _linen(model, size=8, channels=3):
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    variables = model.init(jax.random.key(0), x)
    # non-trivial statistics, so that perturbed BatchNorm inputs move what they should
    if "batch_stats" in variables:
        variables = {**variables, "batch_stats": jax.tree.map(
            lambda s: s + 0.5, variables["batch_stats"])}
    return variables, x


class SetupStyle(nn.Module):
    """Modules declared in ``setup`` (not ``@compact``), nested in a submodule."""

    def setup(self):
        self.blocks = [nn.Conv(4, (3, 3), name=f"conv_{i}") for i in range(2)]
        self.norm = nn.BatchNorm()
        self.head = nn.Conv(3, (1, 1))

    def __call__(self, x, *, train: bool = False):
        h = nn.relu(self.blocks[0](x))
        h = nn.relu(self.norm(self.blocks[1](h), use_running_average=not train)) + h
        return self.head(h)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return SetupStyle(name="inner")(nn.Conv(3, (3, 3), name="stem")(x)) + x


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, train: bool = False):
        h = nn.relu(nn.Conv(4, (3, 3), name="c0")(h))
        return nn.BatchNorm(use_running_average=not train, name="bn")(
            nn.Conv(4, (3, 3), name="c1")(h))


class Rematted(nn.Module):
    """A residual block under ``nn.remat`` (``jax.checkpoint``: the primitive ``remat2`` in
    jax 0.10 and 0.12); ``remat=False``: the same network and parameters without it."""

    remat: bool = True

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        block = nn.remat(_Block, static_argnums=(2,)) if self.remat else _Block
        h = nn.Conv(4, (3, 3), name="stem")(x)
        h = block(name="block")(h, train) + h
        return nn.Conv(3, (1, 1), name="head")(h)


def test_remat_is_followed():
    variables, x = _linen(Rematted())
    graph = trace_topology(Rematted().apply, variables, x, train=False)
    # the truth is measured without remat (its hooks cannot read values inside it); remat
    # changes what is recomputed, not what is computed
    reads, outputs, _ = linen_truth(Rematted(remat=False), variables, x, [])
    agree(graph, reads, outputs)
    assert any(name.startswith("params/block/") for name in graph.leaves)


class Tiled(nn.Module):
    """Upsampling by ``jnp.tile`` (scico's UNet does), and a map tiled along its channels."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        a = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
        low = nn.Conv(3, (3, 3), name="low")(nn.avg_pool(a, (2, 2), strides=(2, 2)))
        low = nn.BatchNorm(use_running_average=not train, name="bn")(low)
        up = jnp.tile(low, (1, 2, 2, 1))  # the spatial axes tiled: channels unchanged
        twice = jnp.tile(nn.Conv(2, (1, 1), name="b")(a), (1, 1, 1, 2))  # b's 2 maps twice
        return nn.Conv(3, (3, 3), name="head")(jnp.concatenate([up, twice, a], -1))


class Separable(nn.Module):
    """MobileNet / ConvNeXt constructs: a depthwise conv (groups = C_in) with BatchNorm, a
    depthwise conv with channel multiplier 2, a grouped conv (2 groups), a pointwise conv
    and a residual add around the block."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        stem = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        h = nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False, name="dw")(stem)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="dw_bn")(h))
        h = nn.relu(nn.Conv(8, (3, 3), feature_group_count=4, name="dw2")(h))  # 2 per input
        h = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, name="grouped")(h))
        h = nn.Conv(4, (1, 1), name="pw")(h) + stem
        return nn.Conv(3, (1, 1), name="head")(h)


class GroupNormed(nn.Module):
    """GroupNorm (its statistics tie the channels of a group) in a residual stream with
    two group sizes, and ShuffleNet's channel shuffle between two grouped convs (a
    reshape into groups, a transpose, a reshape back)."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        stem = nn.Conv(8, (3, 3), name="stem")(x)
        h = nn.relu(nn.GroupNorm(num_groups=2, name="a_gn")(stem))
        h = nn.GroupNorm(num_groups=4, name="b_gn")(nn.Conv(8, (3, 3), name="c")(h)) + stem
        h = nn.Conv(8, (3, 3), feature_group_count=2, name="g1")(nn.relu(h))
        b, height, width, _ = h.shape
        h = h.reshape(b, height, width, 2, 4).swapaxes(-1, -2).reshape(b, height, width, 8)
        h = nn.Conv(6, (3, 3), feature_group_count=2, name="g2")(h)
        return nn.Conv(3, (1, 1), name="head")(h)


class _ExamplesBlock(nn.Module):
    """flax examples/imagenet's ResNetBlock: conv-BN-act-conv-BN, a 1 x 1 projection
    shortcut with its BatchNorm when the shape changes (its stride 2 or its width). The
    activation is silu, not relu: on inputs this small a relu unit can be dead at every
    position, and the perturbation truth then has no evidence for its channel."""

    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False, name="conv1")(x)
        y = nn.silu(norm(name="bn1")(y))
        y = norm(name="bn2")(nn.Conv(self.filters, (3, 3), use_bias=False, name="conv2")(y))
        if x.shape != y.shape:
            x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(x)
            x = norm(name="proj_bn")(x)
        return nn.silu(x + y)


class ExamplesResNet(nn.Module):
    """flax examples/imagenet's ResNet in small: a strided 7 x 7 stem with BatchNorm and
    max pooling, two stages (the second strided, so its first block projects), global
    average pooling and a Dense head."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Conv(4, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                    name="conv_init")(x)
        x = nn.silu(nn.BatchNorm(use_running_average=not train, name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = _ExamplesBlock(4, name="block0")(x, train)
        x = _ExamplesBlock(6, (2, 2), name="block1")(x, train)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


LINEN = {
    "examples-resnet": lambda: ExamplesResNet(),
    "groupnorm": lambda: GroupNormed(),
    "separable": lambda: Separable(),
    "tile": lambda: Tiled(),
    "setup-nested": lambda: Nested(),
    "sequential": lambda: DnCNN(features=(6, 5, 4, 3)),
    "residual": lambda: ResNetDenoiser(width=5, blocks=2),
    "unet": lambda: UNet(features=(4, 6, 8)),
    "densenet": lambda: DenseNetish(),
}


@pytest.mark.parametrize("family", sorted(LINEN))
def test_linen_graph_equals_the_measured_wiring(family):
    model = LINEN[family]()
    variables, x = _linen(model)
    graph = trace_topology(model.apply, variables, x, train=False)
    bn_leaves = [(name, 1) for name in graph.leaves
                 if "_bn" in name or "_gn" in name
                 or name.startswith(("batch_stats/", "params/bn"))]
    reads, outputs, leaf_reads = linen_truth(model, variables, x, bn_leaves)
    agree(graph, reads, outputs)
    exact_readers_agree(graph, reads)
    # every per-channel BatchNorm variable moves only readers of its map's channel
    maps = graph.reads()
    for (name, i), (moved, reached) in leaf_reads.items():
        m = graph.leaves[name][1][i]
        readers = {p for p in moved if p[0] != OUTPUT}
        assert readers and readers <= set(maps.get(m, ())), name
        assert reached <= (m in graph.outputs), name
    assert bn_leaves or family == "densenet"


def exact_readers_agree(graph, reads):
    """Per writer channel, the layer inputs the graph says it flows into are the ones its
    perturbation moves; and graph.readers is their union as (reader, offset)."""
    flows: dict = {}
    for reader in graph.layers:
        for j, sources in enumerate(reader.in_sources):
            for writer in sources:
                flows.setdefault(writer, set()).add((reader.path, j))
    for (layer, c), moved in reads.items():
        assert {p for p in moved if p[0] != OUTPUT} == flows.get((layer, c), set()), (layer, c)
    for layer in graph.layers:
        want = {(r, j - c) for (w, c), ps in flows.items() if w == layer.path for r, j in ps}
        assert set(graph.readers[layer.path]) == want, layer.path


def test_the_families_have_what_they_are_named_for():
    residual = trace_topology(ResNetDenoiser(width=5, blocks=2).apply,
                              *_linen(ResNetDenoiser(width=5, blocks=2)), train=False)
    assert residual.groups == (("stem", "block0_1_conv", "block1_1_conv"),)
    # one decision for the stream, but readers exact per writer: block 0's first conv
    # reads the stream before block 0's second conv is added to it
    assert ("block0_0_conv", 0) in residual.readers["stem"]
    assert ("block0_0_conv", 0) not in residual.readers["block0_1_conv"]
    assert ("block1_0_conv", 0) in residual.readers["block0_1_conv"]
    unet = UNet(features=(4, 6, 8))
    graph = trace_topology(unet.apply, *_linen(unet), train=False)
    assert ("dec0a_conv", 4) in graph.readers["enc0b_conv"]  # the skip, after up0's 4
    assert graph.layer["up1"].kind == "conv_transpose"
    separable = trace_topology(Separable().apply, *_linen(Separable()), train=False)
    assert [(la.path, la.groups, la.c_in, la.c_out) for la in separable.layers
            if la.groups > 1] == [("dw", 4, 4, 4), ("dw2", 4, 4, 8), ("grouped", 2, 8, 6)]
    assert ChannelGraph.from_json(separable.to_json()) == separable
    examples = trace_topology(ExamplesResNet().apply, *_linen(ExamplesResNet()), train=False)
    # the identity shortcut ties block 0 to the stem; the projection starts a new stream
    assert examples.groups == (("conv_init", "block0/conv2"), ("block1/conv2", "block1/proj"))
    assert examples.readers["block1/proj"] == (("head", 0),)
    assert ("block1/proj", 0) in examples.readers["block0/conv2"]
    dense = trace_topology(DenseNetish().apply, *_linen(DenseNetish()))
    assert dense.readers["c0"] == (("c1", 0), ("c2", 0), ("c3", 0))
    assert dense.layer["head"].kind == "dense" and dense.readers["c3"] == (("head", 0),)


def test_sequential_graph_equals_the_hand_written_topology():
    model = DnCNN(features=(8, 8, 12, 6, 3))
    variables, x = _linen(model)
    traced = trace_topology(model.apply, variables, x, train=False)
    written = from_topology(model.topology(), variables["params"], variables["batch_stats"])
    assert [(la.path, la.in_maps, la.out_maps) for la in traced.layers] == [
        (la.path, la.in_maps, la.out_maps) for la in written.layers]
    assert dict(traced.leaves) == dict(written.leaves)
    assert traced.outputs == written.outputs


def test_nnx_graph_equals_the_measured_wiring():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    graphdef, state = nnx.split(model)
    graph = trace_topology(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    reads, outputs, _ = nnx_truth(model, x)
    agree(graph, reads, outputs)
    assert graph.groups == (("stem", "convs/0", "convs/1"),)
    assert graph.readers["stem"] == (("convs/0", 0), ("convs/1", 0), ("head", -1))
    assert "batch_stats/norms/1/mean" in graph.leaves  # integer keys, NNX variable types


class NNXGroupNormed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
        self.head = nnx.Conv(8, 2, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.stem(x))))


class SplitInCond(nn.Module):
    """A cond whose branches return split channels, merged back and read by a conv."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Conv(6, (3, 3), name="stem")(x)
        split = jax.lax.cond(x.sum() > 0, lambda h: h.reshape(*h.shape[:-1], 2, 3),
                             lambda h: 2 * h.reshape(*h.shape[:-1], 2, 3), h)
        return nn.Conv(2, (1, 1), name="head")(split.reshape(h.shape))


class SplitOut(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.Conv(4, (3, 3), name="stem")(x)
        return nn.Conv(4, (1, 1), name="head")(h).reshape(*h.shape[:-1], 2, 2)


def test_split_channels_through_a_cond_and_as_the_output():
    model = SplitInCond()
    variables, x = _linen(model)
    graph = trace_topology(model.apply, variables, x, train=False)
    reads, outputs, _ = linen_truth(model, variables, x)
    agree(graph, reads, outputs)
    exact_readers_agree(graph, reads)
    out = SplitOut()
    graph = trace_topology(out.apply, *_linen(out), train=False)  # every head map an output
    assert graph.outputs == frozenset(graph.layer["head"].out_maps)


def test_a_wide_groupnorm_group_is_one_decision():
    # 1,024 channels a group: the tie is a balanced tree (a chain would recurse 1,023 deep)
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(2048, (1, 1), name="a")(x))
            return nn.Conv(2, (1, 1), name="b")(h)

    x = jnp.zeros((1, 2, 2, 1))
    variables = jax.eval_shape(Wide().init, jax.random.key(0), x)
    graph = trace_topology(Wide().apply, variables, x)
    assert graph.layer["a"].out_maps == (0,) * 1024 + (1,) * 1024


def test_nnx_groupnorm_ties_each_group():
    model = NNXGroupNormed(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    graphdef, state = nnx.split(model)
    graph = trace_topology(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    reads, outputs, _ = nnx_truth(model, x)
    agree(graph, reads, outputs)
    exact_readers_agree(graph, reads)
    assert graph.layer["stem"].out_maps == (0, 0, 1, 1, 2, 2, 3, 3)  # 4 groups of 2


def test_lax_graph_equals_the_measured_wiring():
    params, x = _lax_params(), jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    graph = trace_topology(lax_net, params, x)
    reads, outputs, _ = lax_truth(lax_net, params, x)
    agree(graph, reads, outputs)
    assert graph.readers["w1"] == (("w2", 0), ("w2", 4))  # concat([a, a])
    assert graph.readers["w2"] == (("w3", 1),)  # padded by one channel, its last one cut


# --- refusals: one per construct ---------------------------------------------------------


def _conv(features, **kw):
    return nn.Conv(features, (3, 3), **kw)


class FlattenDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _conv(4, name="a")(x)
        return nn.Dense(2, name="head")(h.reshape(h.shape[0], -1))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k = _conv(4, name="q")(x), _conv(4, name="k")(x)
        return jnp.einsum("bhwc,bHWc->bhwHW", q, k)


class LayerNormed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _conv(2, name="b")(nn.LayerNorm(name="ln")(_conv(4, name="a")(x)))


class SplitThenConv(nn.Module):
    """Channels split in groups by a reshape and read by a conv before being merged back:
    the conv's channel axis is then the group axis, not the channels."""

    @nn.compact
    def __call__(self, x):
        h = _conv(4, name="a")(x)
        return _conv(2, name="b")(h.reshape(*h.shape[:-1], 2, 2)[..., 0])


class TwiceUsed(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = _conv(3, name="shared")
        return conv(nn.relu(conv(x)))


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return nn.relu(_conv(3, name="c")(h)), None
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=2)
        return stack(name="stack")(x, None)[0]


class BroadcastGate(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _conv(4, name="a")(x)
        attention = nn.sigmoid(_conv(1, name="gate")(h))  # one channel times all of them
        return _conv(2, name="b")(h * attention)


class Sorted(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _conv(2, name="b")(jnp.sort(_conv(4, name="a")(x), axis=-1))


REFUSED = {
    "flatten-dense": (FlattenDense, "merges or splits the channel axis", "reshape",
                      "FlattenDense"),
    "attention": (Attention, "attention-style", "dot_general", "Attention"),
    "layernorm": (LayerNormed, "reduction over the channel axis", "reduce_sum", "LayerNormed/ln"),
    "split-then-sliced": (SplitThenConv, "split in groups", "slice", "SplitThenConv"),
    "kernel-twice": (TwiceUsed, "used by two layers", "conv_general_dilated", "TwiceUsed"),
    "scan": (Scanned, "loop", "scan", "Scanned"),
    "broadcast": (BroadcastGate, "one channel is broadcast to many", "mul", "BroadcastGate"),
    "unknown": (Sorted, "no rule for this primitive", "sort", "Sorted"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_what_it_cannot_state_exactly(case):
    cls, problem, primitive, stack = REFUSED[case]
    model = cls()
    x = jnp.ones((1, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(TraceError) as error:
        trace_topology(model.apply, variables, x)
    message = str(error.value)
    assert isinstance(error.value, UsageError)  # the library's error contract
    assert problem in message and f"primitive '{primitive}'" in message, message
    assert stack in message, message
    assert "\n" not in message


def test_a_gate_mask_is_attached_and_a_plain_function_needs_a_layer():
    model = DnCNN(features=(6, 5, 3), use_gates=True)
    variables, x = _linen(model)
    graph = trace_topology(model.apply, variables, x, train=False)
    assert graph.leaves["tgd/gate_bn2/mask"] == (0, graph.layer["conv2"].out_maps)
    with pytest.raises(TraceError, match="no conv or dense layer"):
        trace_topology(lambda v, x: x * v["scale"], {"scale": jnp.ones(3)}, x)


def test_json_form_lists_readers_and_groups():
    model = ResNetDenoiser(width=3, blocks=1)
    graph = trace_topology(model.apply, *_linen(model), train=False)
    record = graph.to_json()
    assert record["readers"]["stem"] == [["block0_0_conv", 0], ["out", 0]]  # the stream
    assert record["groups"] == [["stem", "block0_1_conv"]]
    assert {layer["path"] for layer in record["layers"]} == {
        "stem", "block0_0_conv", "block0_1_conv", "out"}
    assert np.all([isinstance(m, int) for layer in record["layers"] for m in layer["out_maps"]])


class _OneChannelOut(nn.Module):
    """Two 8-channel convs, a scalar (1,) scale shared by all 8 channels, a 1-channel conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x * self.param("shared", nn.initializers.ones, (1,))  # one value, 8 channels
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Conv(1, (3, 3))(x)


def test_a_one_channel_layers_bias_follows_its_channel_and_a_shared_scalar_does_not():
    import tgd_jax

    model, x = _OneChannelOut(), jnp.zeros((1, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    graph = trace_topology(model.apply, variables, x)
    # the (1,) bias of the 1-channel conv is that channel's; the (1,) scale is everyone's
    assert graph.leaves["params/Conv_2/bias"][0] == 0
    assert "params/shared" in graph.other and "params/Conv_2/bias" not in graph.other
    trained = tgd_jax.tgd_plan(variables["params"], graph, 0.5, last="train")
    assert trained.mask["Conv_2"]["bias"].tolist() == [True]  # was frozen as "other"
    frozen = tgd_jax.tgd_plan(variables["params"], graph, 0.5, last="frozen")
    assert frozen.mask["Conv_2"]["bias"] is None or not frozen.mask["Conv_2"]["bias"].any()


def _softsign_primitive():
    from jax.extend.core import Primitive

    prim = Primitive("test_softsign")
    prim.def_impl(lambda x: x / (1 + jnp.abs(x)))
    prim.def_abstract_eval(lambda x: x)  # same shape and dtype
    return prim


class CustomActivation(nn.Module):
    """A residual block whose activation is a primitive of the user's own."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _softsign_primitive().bind
        a = act(nn.Conv(4, (3, 3), name="a")(x))
        b = act(nn.Conv(4, (3, 3), name="b")(a)) + a
        return nn.Conv(3, (1, 1), name="head")(jnp.concatenate([a, b], -1))


def test_a_registered_rule_teaches_the_tracer_a_custom_primitive():
    from tgd_jax.trace import RULES, register_rule

    model = CustomActivation()
    variables, x = _linen(model)
    with pytest.raises(TraceError, match="primitive 'test_softsign'"):
        trace_topology(model.apply, variables, x)
    with pytest.raises(TraceError, match="'no_such_op' has no rule to reuse"):
        register_rule("test_softsign", "no_such_op")
    register_rule("test_softsign", "tanh")
    try:
        with pytest.raises(TraceError, match="already has a rule"):
            register_rule("test_softsign", "exp")  # a typo must not silently re-wire it
        with pytest.raises(TraceError, match="already has a rule"):
            register_rule("conv_general_dilated", "tanh")
        graph = trace_topology(model.apply, variables, x)
        reads, outputs, _ = linen_truth(model, variables, x, [])
        agree(graph, reads, outputs)
        assert graph.groups == (("a", "b"),)
    finally:
        del RULES["test_softsign"]
