"""Kernel Sparsity and Entropy (KSE) of a convolution layer, as pure JAX functions.

KSE (Li et al., CVPR 2019) rates each INPUT channel ``c`` of a conv layer from the
group of 2D kernels that read it, ``{W[n, c] : n = 0 .. N-1}`` (N = output channels):

* sparsity  ``s_c = sum_n |W[n, c]|_1``
* density   ``dm(W[i, c]) = sum of the Euclidean distances from W[i, c] to its k nearest
  neighbours among {W[j, c] : j != i}`` (the kernel itself excluded)
* entropy   ``e_c = -sum_i p_i log2 p_i`` with ``p_i = dm(W[i, c]) / sum_i dm(W[i, c])``
* score     ``KSE_c = sqrt(s_c' / (1 + alpha * e_c'))`` where ``'`` is min-max
  normalisation over the layer's channels; the score is min-max normalised again, so in a
  layer with any spread one channel scores exactly 0 and one exactly 1.

This is the paper's definition (groups share the INPUT channel), not the KSE reference
code, which reshapes a (C, N, ...) array as (N, C, ...) and so scrambles the groups.

Kernels use Flax's layout ``(*spatial, C_in, C_out)``, e.g. ``(kh, kw, C_in, C_out)``.

Degenerate cases, each defined so that no NaN or inf can appear:

* ``k`` larger than a group allows: ``k_eff = min(k, C_out - 1)``. The DnCNN's last conv has
  C_out = 3, so it uses k = 2. With C_out = 1 there are no neighbours: dm = 0.
* ``dm = 0`` (identical kernels): the term ``0 * log 0`` is 0; if every ``dm`` of a group is 0
  (all its kernels identical, or a single kernel) the group has no diversity and ``e_c = 0``.
* Normalising a constant vector (max == min, e.g. a single input channel): there is no
  spread to stretch, so it maps to all ones for a positive constant and to all zeros for
  zeros. Hence all-zero kernels score 0 ("useless") and a layer whose channels cannot be
  told apart scores 1 everywhere ("useful", kept frozen by TGD).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tgd_jax.errors import UsageError

__all__ = [
    "effective_k",
    "kernel_groups",
    "kernel_sparsity",
    "kernel_density",
    "kernel_entropy",
    "minmax_normalize",
    "kse_scores",
]

Array = jax.Array

# Input channels per vectorised chunk of the pairwise-distance computation: a (chunk, N, N)
# block of squared distances stays in cache (4 MB for N = 512), which is what makes it fast.
_DENSITY_CHUNK = 4

# Relative spread under which a vector counts as constant in the normalisation.
_TIE_RTOL = 1e-5


def effective_k(k: int, num_kernels: int) -> int:
    """The number of neighbours actually used: ``min(k, num_kernels - 1)``, at least 0.

    Example:
      >>> effective_k(5, 3), effective_k(5, 1)
      (2, 0)
    """
    if k < 1:
        raise UsageError(f"KSE needs k >= 1 nearest neighbours, got k={k}")
    return max(0, min(k, num_kernels - 1))


def kernel_groups(kernel: Array) -> Array:
    """Regroups a Flax conv kernel by input channel.

    Args:
      kernel: ``(*spatial, C_in, C_out)`` with at least one spatial dimension.

    Returns:
      ``(C_in, C_out, prod(spatial))``: row ``[c, n]`` is the flattened 2D kernel W[n, c].

    Example:
      >>> import jax.numpy as jnp
      >>> kernel_groups(jnp.zeros((3, 3, 4, 8))).shape  # (C_in, C_out, kh * kw)
      (4, 8, 9)
    """
    if kernel.ndim < 3:
        raise UsageError(
            f"a conv kernel must have shape (*spatial, C_in, C_out), got shape {kernel.shape}"
        )
    c_in, c_out = kernel.shape[-2:]
    flat = jnp.reshape(kernel, (-1, c_in, c_out))  # (K, C_in, C_out)
    return jnp.transpose(flat, (1, 2, 0))


@jax.jit
def kernel_sparsity(kernel: Array) -> Array:
    """``s_c = sum_n |W[n, c]|_1``: ``(*spatial, C_in, C_out) -> (C_in,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.ones((3, 3, 2, 4)).at[:, :, 1, :].set(0.0)  # input channel 1 is never read
      >>> kernel_sparsity(w).tolist()
      [36.0, 0.0]
    """
    return jnp.sum(jnp.abs(kernel_groups(kernel)), axis=(1, 2))


def _group_density(group: Array, k: int) -> Array:
    """Density of each kernel of one group: ``(K, N) -> (N,)`` (K taps, N kernels).

    The squared distances are accumulated tap by tap over (N, N) planes, which XLA
    vectorises along N (an (N, N, K) difference reduced over its short last axis runs
    several times slower on the CPU), and the k nearest are chosen on them before the
    square root: sqrt is monotone, so the selection and the result are those of the
    distances themselves, with N^2 - k fewer square roots.
    """
    n = group.shape[1]
    if k == 0:
        return jnp.zeros((n,), group.dtype)
    # Direct differences (not the Gram-matrix trick): identical kernels must give exactly 0.
    sq = jnp.zeros((n, n), group.dtype)
    for tap in range(group.shape[0]):
        diff = group[tap][:, None] - group[tap][None, :]
        sq = sq + diff * diff  # (N, N)
    sq = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, sq)  # exclude the kernel itself
    nearest = jnp.sqrt(-jax.lax.top_k(-sq, k)[0])  # (N, k) smallest distances
    return jnp.sum(nearest, axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def kernel_density(kernel: Array, *, k: int = 5) -> Array:
    """``dm(W[i, c])``: ``(*spatial, C_in, C_out) -> (C_in, C_out)``.

    The sum of Euclidean distances from kernel W[i, c] to its ``min(k, C_out - 1)`` nearest
    neighbours in its input-channel group, itself excluded.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.zeros((1, 1, 1, 3)).at[0, 0, 0].set(jnp.array([0.0, 1.0, 3.0]))
      >>> kernel_density(w, k=1).tolist()  # distance to the nearest other kernel
      [[1.0, 1.0, 2.0]]
    """
    groups = kernel_groups(kernel)  # validates the shape
    k_eff = effective_k(k, groups.shape[1])
    taps = jnp.transpose(groups, (0, 2, 1))  # (C_in, K, C_out)
    return jax.lax.map(lambda g: _group_density(g, k_eff), taps, batch_size=_DENSITY_CHUNK)


def _xlog1px_minus_x(x: Array) -> Array:
    """``(1 + x) log(1 + x) - x`` for ``x >= -1``, accurate near 0 (where it is ~x^2 / 2).

    The direct formula cancels to a relative error ~eps / |x| for small |x|; the Taylor
    series ``sum_{m>=2} (-1)^m x^m / (m (m - 1))`` is used for ``|x| < 0.25`` (14 terms,
    truncation below 1e-9 relative).
    """
    small = jnp.abs(x) < 0.25
    xs = jnp.where(small, x, 0.0)
    series = jnp.zeros_like(x)
    for m in range(15, 1, -1):  # Horner, highest power first
        series = series * xs + (-1.0) ** m / (m * (m - 1))
    series = series * xs * xs
    xd = jnp.where(small, 0.5, x)  # keeps the unused branch finite (and its gradient)
    direct = jnp.where(xd > -1.0, (1.0 + xd) * jnp.log1p(jnp.maximum(xd, -1.0 + 1e-30)), 0.0)
    return jnp.where(small, series, direct - xd)


def _entropy_deficit(dm: Array) -> Array:
    """``log2(N) - e_c`` (bits), computed without cancellation: ``(C, N) -> (C,)``.

    Trained layers have entropies that all sit just below ``log2(N)``; their spread is a
    few thousandths of their size, so float32 ``e_c`` would be mostly rounding noise after
    min-max normalisation. With ``p_i = (1 + x_i) / N`` and ``sum x_i = 0`` the deficit is
    ``mean_i[(1 + x_i) log(1 + x_i) - x_i] / ln 2``, which is accurate to float32 precision
    relative to itself. A group without diversity (all dm = 0) has ``e_c = 0``.
    """
    n = dm.shape[1]
    total = jnp.sum(dm, axis=1, keepdims=True)
    diverse = total[:, 0] > 0
    x = (n * dm - total) / jnp.where(total > 0, total, 1.0)  # p_i N - 1, in [-1, N - 1]
    deficit = jnp.mean(_xlog1px_minus_x(x), axis=1) / jnp.log(2.0)
    return jnp.where(diverse, deficit, jnp.log2(float(n)))


@functools.partial(jax.jit, static_argnames=("k",))
def kernel_entropy(kernel: Array, *, k: int = 5) -> Array:
    """``e_c`` in bits: ``(*spatial, C_in, C_out) -> (C_in,)``, each in ``[0, log2(C_out)]``.

    ``0 * log 0`` is 0; a group whose densities are all 0 has entropy 0.

    Example:
      >>> import jax.numpy as jnp
      >>> kernel_entropy(jnp.ones((3, 3, 2, 4))).tolist()  # identical kernels: no diversity
      [0.0, 0.0]
    """
    dm = kernel_density(kernel, k=k)
    return jnp.log2(float(dm.shape[1])) - _entropy_deficit(dm)


@jax.jit
def minmax_normalize(x: Array) -> Array:
    """``(x - min) / (max - min)`` over a 1-D vector, with a defined constant case.

    A constant vector has no spread: it maps to ones (a positive constant) or zeros. A spread
    below ``1e-5 * max`` counts as constant:
    float32 sums of equal values in a different order differ in their last bits, and
    stretching that to [0, 1] would rank channels by rounding noise. Inputs are assumed
    non-negative (true of every quantity KSE normalises).

    Example:
      >>> import jax.numpy as jnp
      >>> minmax_normalize(jnp.array([1.0, 3.0, 2.0])).tolist()
      [0.0, 1.0, 0.5]
      >>> minmax_normalize(jnp.array([2.0, 2.0])).tolist()  # no spread: divided by the maximum
      [1.0, 1.0]
    """
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    has_spread = span > _TIE_RTOL * hi
    spread = (x - lo) / jnp.where(has_spread, span, 1.0)
    # Extremes set exactly (XLA may divide by multiplying with the reciprocal: hi / hi
    # became 0.99999994), so that phi = 1 keeps a score of 1 frozen; a vector constant up
    # to the tolerance is all ones (or zeros), not x / hi, which differs in the last bits.
    spread = jnp.where(x == hi, 1.0, jnp.where(x == lo, 0.0, spread))
    constant = jnp.where(hi > 0, jnp.ones_like(x), jnp.zeros_like(x))
    return jnp.where(has_spread, spread, constant)


def kse_scores(kernel: Array, *, alpha: float = 1.0, k: int = 5) -> Array:
    """KSE score of each input channel of a conv layer, normalised to ``[0, 1]``.

    Args:
      kernel: Flax conv kernel ``(*spatial, C_in, C_out)``.
      alpha: weight of the entropy term, ``>= 0`` (the paper uses 1).
      k: nearest neighbours in the density; ``min(k, C_out - 1)`` is used.

    Jit-compiled (``k`` static); ``alpha`` may be traced, and is then not checked.

    Raises:
      UsageError: a concrete ``alpha`` that is negative or not finite (``1 + alpha * e``
        could reach 0 and give NaN scores, which no threshold would retrain).

    Returns:
      ``(C_in,)`` float32 array in ``[0, 1]``. Low scores mark input feature maps that carry
      little information: TGD retrains the kernels of the previous layer that make them.

    Example:
      >>> import jax
      >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)).at[:, :, 2, :].set(0.0)
      >>> scores = kse_scores(w)  # input channel 2 is read by all-zero kernels only
      >>> scores.shape, float(scores[2]), float(scores.max())
      ((4,), 0.0, 1.0)
    """
    if not isinstance(alpha, jax.core.Tracer) and not 0.0 <= float(alpha) < float("inf"):
        raise UsageError(f"KSE alpha must be finite and >= 0, got {alpha}")
    return _kse_scores(kernel, alpha=alpha, k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _kse_scores(kernel: Array, *, alpha: float | Array, k: int) -> Array:
    kernel = jnp.asarray(kernel, jnp.float32)
    s = minmax_normalize(kernel_sparsity(kernel))
    deficit = _entropy_deficit(kernel_density(kernel, k=k))
    entropy = jnp.log2(float(kernel.shape[-1])) - deficit
    # Min-max is shift-invariant: normalise -deficit (accurate) where entropy has a spread,
    # and fall back to entropy itself for the constant case (which depends on its value).
    e = jnp.where(
        jnp.max(deficit) - jnp.min(deficit) > _TIE_RTOL * jnp.max(deficit),
        minmax_normalize(jnp.max(deficit) - deficit),
        minmax_normalize(entropy),
    )
    return minmax_normalize(jnp.sqrt(s / (1.0 + alpha * e)))
