"""The training step: ours (JAX/Flax, the library's own train_step) against PyTorch.

Both train the same 2.5D DnCNN (3x3 convs, conv bias, BatchNorm, ReLU, residual output)
with Adam and an MSE loss on ``(B, 32, 32, 3)`` patches, in float32 or with bfloat16
computation (parameters and optimizer state stay float32 in both: Flax's ``dtype``, and
PyTorch's autocast). On a GPU, PyTorch runs on the GPU too.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_interleaved, time_rounds
from tgd_jax import methods, optim
from tgd_jax.pet.models import PAPER_FEATURES, DnCNN, scaled_features
from tgd_jax.train import parallel, step


def forward_flops(features: tuple[int, ...], batch: int, size: int, kernel: int = 3) -> int:
    """Multiply-adds x 2 of the convolutions of one forward pass (BN/ReLU not counted).

    Every output pixel counts all ``kernel**2`` taps, zero padding included (the usual
    convention, and what PyTorch and XLA compute); XLA's own cost analysis counts only the
    taps inside the image, a factor ``((3 * size - 2) / (3 * size))**2`` fewer for 3x3
    kernels (``tests/test_benchmarks.py`` checks both).
    """
    channels = (3, *features)
    return sum(2 * batch * size * size * kernel * kernel * c_in * c_out
               for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))


def train_flops(features: tuple[int, ...], batch: int, size: int) -> int:
    """A training step as 3 forward passes of convolutions: the forward, the input gradient
    and the weight gradient (the usual estimate; conv1's unneeded input gradient counted)."""
    return 3 * forward_flops(features, batch, size)


def _batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, (batch, size, size, 3)).astype(np.float32)
    return {"inputs": x, "targets": (x * 0.9).astype(np.float32)}


def jax_step(width: float, batch: int, size: int = 32, mode: str = "plain",
             devices: int | None = None, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """``(fn, state, batch)``: ``fn(state, batch)`` is one jitted, data-parallel step.

    ``mode``: ``plain`` (no TGD), ``projected`` or ``paper`` (TGD plan at phi 0.3);
    ``dtype``: the computation dtype (``float32`` or ``bfloat16``).
    """
    model = DnCNN(width_multiplier=width, use_gates=mode == "paper", dtype=jnp.dtype(dtype))
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    inner = optim.make_optimizer(num_steps=1000, learning_rate=1e-3)
    plan = None
    if mode != "plain":
        plan = methods.tgd_plan(variables["params"], model.topology(), 0.3, mode=mode,
                                batch_stats=variables["batch_stats"])
    tx = inner if plan is None else plan.optimizer(inner)
    state = step.create_train_state(variables, tx, plan)
    mesh = parallel.make_mesh(devices or 0)
    fn = parallel.jit_step(functools.partial(step.train_step, model=model, tx=tx), mesh)
    state = parallel.replicate(state, mesh)
    data = parallel.shard_batch(_batch(batch, size), mesh)
    return fn, state, data


def runner(width: float, batch: int, *, mode: str = "plain",
           devices: int | None = None, dtype: str = "float32") -> Any:
    """A no-argument function running one blocking step (the state carried along)."""
    fn, state, data = jax_step(width, batch, mode=mode, devices=devices, dtype=dtype)
    holder = {"state": state}

    def run() -> None:
        new, metrics = fn(holder["state"], data)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = new

    return run


def time_jax(width: float, batch: int, *, mode: str = "plain", rounds: int = 5,
             number: int = 3, devices: int | None = None, dtype: str = "float32"
             ) -> dict[str, Any]:
    return time_rounds(runner(width, batch, mode=mode, devices=devices, dtype=dtype),
                       rounds=rounds, number=number)


def time_modes(width: float, batch: int, *, rounds: int = 5, number: int = 3
               ) -> dict[str, Any]:
    """Plain, projected-TGD and paper-TGD steps, rounds interleaved (small differences)."""
    return time_interleaved({mode: runner(width, batch, mode=mode)
                             for mode in ("plain", "projected", "paper")},
                            rounds=rounds, number=number)


def time_torch(width: float, batch: int, *, rounds: int = 5, number: int = 3,
               size: int = 32, dtype: str = "float32") -> dict[str, Any] | None:
    """The same step in PyTorch (channels_last; oneDNN on a CPU, cuDNN with autotuning on
    the GPU when JAX runs on one), or None if torch is missing."""
    try:
        import torch
    except ImportError:
        return None
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    features = scaled_features(PAPER_FEATURES, width)
    layers: list[Any] = []
    c_in = 3
    for i, c_out in enumerate(features):
        layers.append(torch.nn.Conv2d(c_in, c_out, 3, padding=1))
        if 0 < i < len(features) - 1:
            layers.append(torch.nn.BatchNorm2d(c_out, momentum=0.1))
        if i < len(features) - 1:
            layers.append(torch.nn.ReLU())
        c_in = c_out
    net = torch.nn.Sequential(*layers).to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = _batch(batch, size)
    x, y = (torch.from_numpy(data[k]).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).to(device) for k in ("inputs", "targets"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.mean((x - net(x).float() - y) ** 2)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    return {**time_rounds(run, rounds=rounds, number=number),
            "threads": torch.get_num_threads(), "device": device.type}


def matmul_peak(n: int = 4096, rounds: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """GFLOP/s of an ``n x n`` matmul in JAX: the machine's practical peak for ``dtype``
    (the denominator of the MFU figures). On a GPU, float32 matmuls use XLA's default
    precision (TF32 tensor cores on Ampere and later)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    t = time_rounds(lambda: jax.block_until_ready(f(a)), rounds=rounds, number=1)
    return {**t, "gflops": 2 * n ** 3 / t["min_s"] / 1e9, "n": n, "dtype": dtype}
