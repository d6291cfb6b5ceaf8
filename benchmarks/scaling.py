r"""The scaling section of ``make bench``: 1 and 2 devices, 1 and 2 processes, on this CPU.

  python -m benchmarks --sections=scaling --rounds=3

Every configuration runs in fresh processes, at the demo step (width 0.25, global batch
16, 32 x 32 patches):

* ``1 device``: one process, one device, the whole batch (``--cpu_devices=1``);
* ``compute (1 device, half batch)``: what each of 2 devices computes, with no all-reduce;
* ``2 devices``: one process split into 2 CPU devices (``--cpu_devices=2``), XLA's
  in-process all-reduce;
* ``2 processes``: 2 processes of 1 device (``--num_processes=2``), gloo over TCP;
* ``all-reduce``: the sum over the 2 devices / processes of a float32 vector the size of
  the demo and of the paper network's parameters, alone.

The all-reduce's share of a step is the 2-way step minus the half-batch compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

#: The demo step of the benchmarks (``benchmarks.step``).


def _demo() -> tuple[float, int]:
    """The demo config preset's width multiplier and global batch."""
    from tgd_jax.pet import config  # imports jax, but starts no backend: flags still apply

    c = config.train_config("demo")
    return c.model.width_multiplier, c.batch_size


WIDTH, BATCH = _demo()


def _params(width: float) -> int:
    import jax
    import jax.numpy as jnp

    from tgd_jax.pet.models import DnCNN

    variables = jax.eval_shape(DnCNN(width_multiplier=width).init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _allreduce(size: int, rounds: int) -> dict[str, Any]:
    """Time of summing a float32 ``(devices, size)`` array over the mesh: one gradient's
    all-reduce, alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.timing import time_rounds
    from tgd_jax.train import parallel

    mesh = parallel.make_mesh()
    n = mesh.devices.size
    local = np.ones((n // jax.process_count(), size), np.float32)
    x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), local, (n, size))
    total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=parallel.replicated(mesh))
    return time_rounds(lambda: jax.block_until_ready(total(x)), rounds=rounds, number=5)


def worker(devices: int, batch: int, rounds: int, address: str | None = None,
           processes: int = 1, index: int = 0) -> dict[str, Any]:
    """One configuration, in this fresh process (``devices`` in all, over ``processes``)."""
    from tgd_jax.train import parallel

    if processes > 1:
        parallel.init_distributed(address, processes, index)
    else:
        parallel.use_cpu_cores(batch, devices)
    import jax

    from benchmarks import step

    # each process makes its rows of the global batch (the commands' data path)
    out = {"step": step.time_jax(WIDTH, batch // jax.process_count(), rounds=rounds)}
    if devices > 1:
        out["allreduce"] = {name: _allreduce(_params(width), rounds)
                            for name, width in (("demo", WIDTH), ("paper", 1.0))}
    out["params"] = {"demo": _params(WIDTH), "paper": _params(1.0)}
    return out


def _run(args: list[str], processes: int = 1) -> dict[str, Any]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if processes == 1:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", *args], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    from tgd_jax.train import parallel

    address = f"localhost:{parallel.free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", *args,
                               f"--address={address}", f"--processes={processes}",
                               f"--index={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise RuntimeError(f"scaling worker failed:\n{err[-2000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def measure(rounds: int = 5) -> dict[str, Any]:
    """Every configuration of the module docstring; the ``json`` of ``bench.json``."""
    t0 = time.perf_counter()
    r = {"1 device": _run(["--devices=1", f"--batch={BATCH}", f"--rounds={rounds}"]),
         "compute (1 device, half batch)": _run(["--devices=1", f"--batch={BATCH // 2}",
                                                 f"--rounds={rounds}"]),
         "2 devices": _run(["--devices=2", f"--batch={BATCH}", f"--rounds={rounds}"]),
         "2 processes": _run(["--devices=2", f"--batch={BATCH}", f"--rounds={rounds}"],
                             processes=2)}
    base, compute = r["1 device"]["step"]["min_s"], r["compute (1 device, half batch)"][
        "step"]["min_s"]
    for name in ("2 devices", "2 processes"):
        r[name]["speedup"] = base / r[name]["step"]["min_s"]
        r[name]["allreduce_share_s"] = r[name]["step"]["min_s"] - compute
    r["wall_s"] = time.perf_counter() - t0
    from benchmarks import step
    from tgd_jax.pet.models import PAPER_FEATURES

    r["paper_model"] = paper_model(r["1 device"]["params"]["paper"],
                                   step.train_flops(PAPER_FEATURES, 1, 32))
    return r


def table(r: dict[str, Any]) -> list[str]:
    """The markdown rows of :func:`measure`'s result."""
    base = r["1 device"]["step"]["min_s"]
    params = r["1 device"]["params"]
    out = [f"| demo step (batch {BATCH}) | step | speed-up | step - half-batch compute | "
           f"all-reduce alone: demo ({params['demo']:,} params) / paper "
           f"({params['paper']:,}) |", "|---|---|---|---|---|"]
    for name, row in r.items():
        if not isinstance(row, dict) or "step" not in row:
            continue
        t = row["step"]["min_s"]
        share = (f"{1e3 * row['allreduce_share_s']:.1f} ms" if "allreduce_share_s" in row
                 else "")
        ar = row.get("allreduce")
        alone = (f"{1e3 * ar['demo']['min_s']:.2f} / {1e3 * ar['paper']['min_s']:.2f} ms"
                 if ar else "")
        out.append(f"| {name} | {1e3 * t:.1f} ms | {base / t:.2f}x | {share} | {alone} |")
    if "paper_model" in r:
        out += ["", *paper_table(r["paper_model"])]
    return out


# --- the on-paper model: the paper's network on 8 TPU v5e chips and on 8 GPUs ------------

#: Stated inputs of :func:`paper_model` (published specifications, our measurements, and
#: assumptions, each named).
PAPER_MODEL_INPUTS = {
    "devices": 8,
    "tpu_v5e_peak_flops": 197e12,  # bf16 per chip, Google Cloud's published v5e figure
    "tpu_v5e_mfu": 0.5,  # assumed; our H100 steps reach 36-96 % of the measured matmul peak
    "tpu_v5e_ring_bytes_per_s": 100e9,  # assumed: half of the chip's 1,600 Gbps (200 GB/s) ICI
    "gpu_ring_bytes_per_s": 360e9,  # assumed: 80 % of NVLink 4's 450 GB/s per direction (H100)
    "hop_latency_s": 5e-6,  # assumed, per ring hop, both systems
    # H100 paper-width bfloat16 steps measured here (benchmarks/RESULTS.md, 2026-11-26):
    # 6.79 ms at batch 256 and 21.85 ms at 1024 per GPU; the line through them:
    "gpu_step_floor_s": 6.79e-3 - 256 * (21.85e-3 - 6.79e-3) / 768,
    "gpu_step_per_example_s": (21.85e-3 - 6.79e-3) / 768,
    "allreduce_share": 0.1,  # "stops mattering": at most this share of the step
}


def paper_model(params: int, flops_per_example: float) -> dict[str, Any]:
    """Per-step compute and gradient all-reduce of the paper's network (float32 gradients
    of ``params`` parameters, ``flops_per_example`` per 32 x 32 training patch) on 8 TPU
    v5e chips and on 8 H100 GPUs, data parallel, all-reduce not overlapped with compute.

    A ring all-reduce of ``S`` bytes over ``N`` devices takes ``2 (N-1)/N S / bandwidth +
    2 (N-1) hop latency``. Returns the all-reduce time, the compute per step at the paper's
    global batch of 32, and the global batch from which the all-reduce is at most
    ``allreduce_share`` of the step.
    """
    i = PAPER_MODEL_INPUTS
    n, size = i["devices"], 4 * params
    out: dict[str, Any] = {"inputs": i, "params": params, "gradient_bytes": size,
                           "flops_per_example": flops_per_example}

    def ring(bandwidth: float) -> float:
        return 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * i["hop_latency_s"]

    tpu_example = flops_per_example / (n * i["tpu_v5e_peak_flops"] * i["tpu_v5e_mfu"])
    gpu = lambda batch: i["gpu_step_floor_s"] + i["gpu_step_per_example_s"] * batch / n  # noqa: E731
    for name, allreduce, compute in (("tpu_v5e_8", ring(i["tpu_v5e_ring_bytes_per_s"]),
                                      lambda batch: batch * tpu_example),
                                     ("h100_8", ring(i["gpu_ring_bytes_per_s"]), gpu)):
        ratio = (1 - i["allreduce_share"]) / i["allreduce_share"]  # compute >= 9 x all-reduce
        batch = 8
        while compute(batch) < ratio * allreduce:
            batch += 8  # global batches that split over the 8 devices
        out[name] = {"allreduce_s": allreduce, "compute_b32_s": compute(32),
                     "allreduce_share_b32": allreduce / (allreduce + compute(32)),
                     "batch_where_allreduce_stops_mattering": batch}
    return out


def paper_table(m: dict[str, Any]) -> list[str]:
    """The markdown rows of :func:`paper_model`."""
    out = ["| 8 devices, paper network | gradient all-reduce | compute at batch 32 | "
           "all-reduce share at batch 32 | global batch where it is <= 10 % |",
           "|---|---|---|---|---|"]
    for name, label in (("tpu_v5e_8", "TPU v5e host (8 chips)"), ("h100_8", "8 x H100")):
        r = m[name]
        out.append(f"| {label} | {1e6 * r['allreduce_s']:.0f} us | "
                   f"{1e3 * r['compute_b32_s']:.2f} ms | {100 * r['allreduce_share_b32']:.0f} % "
                   f"| {r['batch_where_allreduce_stops_mattering']} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=0)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--address", default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--index", type=int, default=0)
    a = parser.parse_args()
    if not a.devices:  # the whole section
        result = measure(a.rounds)
        print("\n".join(table(result)))
        print(json.dumps(result))
        return
    out = worker(a.devices, a.batch, a.rounds, a.address, a.processes, a.index)
    if a.index == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
