"""Tracing a network's channel graph and planning on it: a UNet with 20+ layers next to the
paper's DnCNN (both at full width), KSE of all their layers included."""

from __future__ import annotations

from typing import Any

from benchmarks.timing import time_rounds


def _network(name: str) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    from tgd_jax.pet.models import DnCNN, UNet

    model = UNet(features=(32, 64, 128, 256, 512)) if name == "unet" else DnCNN()
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return model, model.init(jax.random.key(0), x), x


def _one(name: str, rounds: int) -> dict[str, Any]:
    import jax

    from tgd_jax import masks, tgd_plan, trace_topology

    model, variables, x = _network(name)
    graph = trace_topology(model.apply, variables, x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    trace = time_rounds(lambda: trace_topology(model.apply, variables, x, train=False),
                        rounds=rounds, warmup=1)
    plan = time_rounds(lambda: tgd_plan(params, graph, 0.3, batch_stats=stats),
                       rounds=rounds, warmup=1)
    kse = time_rounds(lambda: jax.block_until_ready(masks.map_scores(params, graph)),
                      rounds=rounds, warmup=1)
    return {"layers": len(graph.layers),
            "multi_reader_maps": sum(len(r) > 1 for r in graph.reads().values()),
            "params": int(sum(v.size for v in jax.tree.leaves(params))),
            "trace": trace, "plan": plan, "kse": kse}


def measure(rounds: int = 3) -> dict[str, Any]:
    """Per network: layers, parameters, trace / plan (KSE included) / KSE-only seconds."""
    return {name: _one(name, rounds) for name in ("dncnn", "unet")}
