"""KSE of the paper network: cold (fresh process, compilation included) and warm, against
the per-input-channel scikit-learn loop the KSE authors use."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks.timing import time_rounds

_COLD = """
import json, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
from tgd_jax.io import startup
from tgd_jax import masks
from tgd_jax.pet.models import DnCNN
startup.use_compilation_cache(sys.argv[1])
model = DnCNN()
params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
t1 = time.perf_counter()
jax.block_until_ready(masks.layer_scores(params, model.topology()))
print(json.dumps({"import_and_init_s": t1 - t0, "first_call_s": time.perf_counter() - t1}))
"""


def _paper_kernels() -> tuple[Any, Any, list[np.ndarray]]:
    import jax
    import jax.numpy as jnp

    from tgd_jax.pet.models import DnCNN

    model = DnCNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernels = [np.asarray(params[n.consumer]["kernel"]) for n in model.topology()
               if n.consumer]
    return params, model.topology(), kernels


def sklearn_density(kernel: np.ndarray, k: int = 5) -> np.ndarray | None:
    """dm per input channel with scikit-learn's NearestNeighbors, one channel at a time."""
    try:
        from sklearn.neighbors import NearestNeighbors
    except ImportError:
        return None
    c_in, c_out = kernel.shape[-2:]
    groups = kernel.reshape(-1, c_in, c_out).transpose(1, 2, 0)  # (C_in, C_out, K)
    k_eff = min(k, c_out - 1)
    out = np.zeros((c_in, c_out), np.float32)
    for c in range(c_in):
        nn = NearestNeighbors(n_neighbors=k_eff + 1).fit(groups[c])
        dist, _ = nn.kneighbors(groups[c])
        out[c] = dist[:, 1:].sum(axis=1)
    return out


def profile_largest_layer(rounds: int = 5) -> dict[str, float]:
    """Where the warm time goes, on the 256 -> 256 layer (conv7's kernel, read by KSE of
    conv6's maps): the whole score, the density, and XLA's top_k alone on its distances."""
    import jax

    from tgd_jax import kse

    w = jax.random.normal(jax.random.key(0), (3, 3, 256, 256))
    d = jax.random.uniform(jax.random.key(1), (256, 256, 256))
    top_k = jax.jit(lambda d: jax.lax.top_k(-d, 5)[0])
    parts = {"kse_scores": lambda: kse.kse_scores(w), "kernel_density": lambda: (
        kse.kernel_density(w)), "top_k_of_distances": lambda: top_k(d)}
    return {name: time_rounds(lambda f=f: jax.block_until_ready(f()), rounds=rounds)["min_s"]
            for name, f in parts.items()}


def measure(rounds: int = 5) -> dict[str, Any]:
    import jax

    from tgd_jax import masks

    def fresh_process(cache: str) -> dict[str, float]:
        proc = subprocess.run([sys.executable, "-c", _COLD, cache], capture_output=True,
                              text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold = fresh_process("off")
    with tempfile.TemporaryDirectory() as cache:
        fresh_process(cache)  # fills the persistent compilation cache
        cold_cached = fresh_process(cache)
    params, topology, kernels = _paper_kernels()
    warm = time_rounds(lambda: jax.block_until_ready(masks.layer_scores(params, topology)),
                       rounds=rounds)
    result: dict[str, Any] = {"cold": cold, "cold_cached": cold_cached, "warm": warm,
                              "sklearn": None,
                              "largest_layer_s": profile_largest_layer(rounds)}
    if sklearn_density(kernels[-1]) is not None:  # the density alone, the costly part
        result["sklearn"] = time_rounds(lambda: [sklearn_density(k) for k in kernels],
                                        rounds=3, warmup=1)
    return result
