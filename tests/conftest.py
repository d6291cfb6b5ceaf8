"""Shared test fixtures: tiny models and a brute-force NumPy KSE written from the formulas."""

from __future__ import annotations

import numpy as np


def reference_normalize(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    if hi - lo > 1e-5 * hi:  # the library's tie tolerance (float32 rounding)
        return (x - lo) / (hi - lo)
    return x / hi if hi > 0 else np.zeros_like(x)


def reference_kse(kernel, alpha: float = 1.0, k: int = 5):
    """Loops straight from the paper's formulas, float64. Returns (s, dm, e, kse)."""
    w = np.asarray(kernel, np.float64)
    c_in, n_out = w.shape[-2:]
    kk = max(0, min(k, n_out - 1))
    s = np.zeros(c_in)
    dm = np.zeros((c_in, n_out))
    e = np.zeros(c_in)
    for c in range(c_in):
        group = [w[..., c, n].ravel() for n in range(n_out)]
        s[c] = sum(np.abs(g).sum() for g in group)
        for i in range(n_out):
            dists = sorted(
                np.sqrt(((group[i] - group[j]) ** 2).sum()) for j in range(n_out) if j != i
            )
            dm[c, i] = sum(dists[:kk])
        total = dm[c].sum()
        for i in range(n_out):
            p = dm[c, i] / total if total > 0 else 0.0
            if p > 0:
                e[c] -= p * np.log2(p)
    sn, en = reference_normalize(s), reference_normalize(e)
    score = reference_normalize(np.sqrt(sn / (1 + alpha * en)))
    return s, dm, e, score

