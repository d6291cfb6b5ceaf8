r"""A lever tried for the train step: 3x3 convolutions as im2col + one matmul, against XLA's
own convolution, on the DnCNN's conv stack (forward + backward, ReLU between layers).

    python -m benchmarks.im2col_conv
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.__main__ import _sizes
from benchmarks.timing import time_rounds
from tgd_jax.pet.models import PAPER_FEATURES, scaled_features

SIZES = tuple((name, scaled_features(PAPER_FEATURES, width), batch)
              for name, width, batch in _sizes()[:2])


def conv_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_nchw(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same convolution with channels-first activations (the layout lever). Takes and
    returns NHWC; the transposes sit at the ends, so XLA may keep NCHW in between."""
    y = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), w, (1, 1), "SAME",
                                     dimension_numbers=("NCHW", "HWIO", "NCHW"))
    return jnp.transpose(y, (0, 2, 3, 1))


def conv_im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same 'SAME' 3x3 convolution: the 9 shifted copies side by side, then one dot."""
    kh, kw, c_in, c_out = w.shape
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(kh)
                            for j in range(kw)], axis=-1)
    return jnp.dot(cols, w.reshape(kh * kw * c_in, c_out))


def step_time(conv, features, batch, size=32, rounds=5) -> float:
    key = jax.random.key(0)
    weights, c = [], 3
    for f in features:
        key, k = jax.random.split(key)
        weights.append(jax.random.normal(k, (3, 3, c, f)) * 0.1)
        c = f
    x = jax.random.normal(key, (batch, size, size, 3))

    def loss(ws):
        h = x
        for i, w in enumerate(ws):
            h = conv(h, w)
            if i < len(ws) - 1:
                h = jax.nn.relu(h)
        return jnp.mean(h ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    return time_rounds(lambda: jax.block_until_ready(grad(weights)), rounds=rounds,
                       number=3)["min_s"]


def main() -> None:
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
    w = jax.random.normal(jax.random.key(2), (3, 3, 5, 4))
    error = float(jnp.max(jnp.abs(conv_xla(x, w) - conv_im2col(x, w))))
    print(f"max |xla - im2col| on a test input: {error:.2e}")
    error = float(jnp.max(jnp.abs(conv_xla(x, w) - conv_nchw(x, w))))
    print(f"max |xla - nchw| on a test input: {error:.2e}")
    from benchmarks import step

    for name, features, batch in SIZES:
        a, b = step_time(conv_xla, features, batch), step_time(conv_im2col, features, batch)
        print(f"{name}: XLA conv {1e3 * a:.1f} ms, im2col {1e3 * b:.1f} ms "
              f"(im2col is {a / b:.2f}x the speed)")
        c = step_time(conv_nchw, features, batch)
        print(f"{name}: channels-first (NCHW) conv {1e3 * c:.1f} ms ({a / c:.2f}x the speed "
              "of NHWC)")
        # The fused-BatchNorm lever's ceiling: what the whole step spends beyond the
        # convolutions (BatchNorm, bias, loss, Adam) is all a fused BatchNorm could save.
        width = features[0] / 64
        full = step.time_jax(width, batch, rounds=5)["min_s"]
        print(f"{name}: the conv stack (forward + backward, ReLU) is {1e3 * a:.1f} ms of the "
              f"full train step's {1e3 * full:.1f} ms ({100 * a / full:.0f} %)")


if __name__ == "__main__":
    main()
