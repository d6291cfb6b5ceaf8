"""The benchmark suite's arithmetic and report (no timing is asserted here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import __main__ as bench
from benchmarks import step
from benchmarks.im2col_conv import conv_im2col, conv_nchw, conv_xla


def test_flop_count_by_hand():
    # conv1: 3 -> 4 channels, conv2: 4 -> 3, batch 2, 5 x 5 pixels, 3 x 3 kernels.
    per_pixel = 9 * (3 * 4 + 4 * 3)
    assert step.forward_flops((4, 3), batch=2, size=5) == 2 * 2 * 25 * per_pixel
    assert step.train_flops((4, 3), batch=2, size=5) == 3 * 2 * 2 * 25 * per_pixel


def test_flop_count_matches_xla_for_the_convolutions():
    # Independent count: XLA's cost analysis of the same convolutions (no BN, no bias).
    features, batch, size = (8, 6, 3), 2, 8
    shapes = list(zip((3, *features[:-1]), features, strict=True))
    weights = [jnp.ones((3, 3, a, b)) for a, b in shapes]

    def forward(x):
        for w in weights:
            x = conv_xla(x, w)
        return x

    cost = jax.jit(forward).lower(jnp.ones((batch, size, size, 3))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost or "flops" not in cost:
        pytest.skip("this jaxlib reports no cost analysis")
    # XLA counts only the taps that land inside the image ('SAME' zero padding skipped):
    # per axis 3 * size - 2 of the 3 * size, so the padded count shrinks by that square.
    inside = ((3 * size - 2) / (3 * size)) ** 2
    assert cost["flops"] == pytest.approx(step.forward_flops(features, batch, size) * inside,
                                          rel=1e-6)


def test_im2col_is_the_same_convolution():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
    w = jax.random.normal(jax.random.key(2), (3, 3, 5, 4))
    assert jnp.allclose(conv_xla(x, w), conv_im2col(x, w), atol=1e-4)
    assert jnp.allclose(conv_xla(x, w), conv_nchw(x, w), atol=1e-5)


def test_the_table_reports_every_section():
    t = {"min_s": 0.1, "median_s": 0.11, "rounds": 5, "number": 3}
    result = {
        "date": "2026-11-26",
        "machine": {"cpu": "test cpu", "cores": 2, "platform": "cpu",
                    "versions": {"jax": "x", "torch": "y"}},
        "peak": {"gflops": 200.0},
        "step": [{"size": "demo", "width": 0.25, "batch": 16, "ours": t,
                  "torch": {**t, "min_s": 0.05}, "ours_gflops": 50.0, "torch_gflops": 100.0,
                  "speedup_vs_torch": 0.5}],
        "tgd": {"plain": t, "projected_overhead": 0.01, "paper_overhead": 0.04},
        "kse": {"warm": t, "cold": {"first_call_s": 2.0}, "sklearn": {**t, "min_s": 1.0},
                "largest_layer_s": {"kse_scores": 0.1, "kernel_density": 0.09,
                                    "top_k_of_distances": 0.08}},
        "osem": {"slices": 16, "iterations": 3, "subsets": 12, "ours_slices_per_s": 20.0,
                 "skimage_slices_per_s": 5.0, "ratio": 4.0, "liver_mean_ours": 2.5,
                 "liver_mean_skimage": 2.5},
        "scaling": {"1": {**t, "speedup": 1.0}, "2": {**t, "min_s": 0.05, "speedup": 2.0}},
        "graph": {"unet": {"layers": 23, "multi_reader_maps": 96, "params": 1000, "trace": t,
                           "plan": {**t, "min_s": 2.0}, "kse": {**t, "min_s": 1.5}}},
    }
    text = bench.table(result)
    for fragment in ("200 GFLOP/s", "**0.50x**", "25 %", "projected **+1.0 %**",
                     "**10.0x** warm", "**4.0x**", "| 2 | 50.0 ms | 2.00x |",
                     "| unet | 23 | 96 | 1,000 | 100 ms | 2000 ms | 1500 ms |"):
        assert fragment in text, fragment


def test_bfloat16_step_keeps_float32_state_and_the_same_loss():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        fn, state, data = step.jax_step(0.125, 4, size=16, dtype=dtype, devices=1)
        new, metrics = fn(state, data)
        losses[dtype] = float(metrics["loss"])
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
    # bfloat16 has an 8-bit mantissa: the same loss to about 1 %, not bit for bit
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=3e-2)
    assert losses["bfloat16"] != losses["float32"]


def test_the_on_paper_scaling_model_by_hand():
    from benchmarks import scaling

    m = scaling.paper_model(params=1_000_000, flops_per_example=8e9)
    # ring all-reduce of 4 MB over 8 TPU v5e chips: 2 * 7/8 * 4e6 / 100e9 + 14 * 5 us
    assert m["tpu_v5e_8"]["allreduce_s"] == pytest.approx(70e-6 + 70e-6)
    # compute: 32 * 8e9 / (8 chips * 197e12 * 0.5)
    assert m["tpu_v5e_8"]["compute_b32_s"] == pytest.approx(32 * 8e9 / (8 * 98.5e12))
    batch = m["tpu_v5e_8"]["batch_where_allreduce_stops_mattering"]
    per_example = 8e9 / (8 * 98.5e12)
    assert batch * per_example >= 9 * 140e-6 > (batch - 8) * per_example
    rows = scaling.paper_table(m)
    assert rows[2].startswith("| TPU v5e host (8 chips) | 140 us |")
