"""The threshold study of a trained DnCNN checkpoint on held-out simulator data (``threshold.py``).

Writes into ``out``: ``threshold.json`` (:func:`tgd_jax.threshold.threshold_study` plus
provenance), ``threshold.png`` (the paper's figure as curves: fraction dropped and held-out
loss vs phi, KSE against random and L1) and ``kse_hist.png`` (KSE per layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax import masks as masks_lib
from tgd_jax import threshold as threshold_lib
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import data as data_lib
from tgd_jax.pet.models import model_from_config, model_graph
from tgd_jax.train import checkpoints as ckpt_lib

__all__ = ["held_out_batch", "threshold_checkpoint", "threshold_figure", "kse_figure"]


def held_out_batch(path: str, version: str, studies: int, *, scale: float, patch_size: int,
                   examples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``examples`` fixed, unaugmented patches of the LAST ``studies`` studies of ``path``."""
    info = data_lib.open_dataset(path)
    _, held = data_lib.split_studies(info.studies, studies)
    pairs = data_lib.supervised_pairs(path, version, held, scale=scale, info=info)
    return data_lib.sample_batch(pairs, seed=seed, step=0, batch_size=examples,
                                 patch_size=patch_size, augment=False,
                                 stream=data_lib.STREAM_VAL)


def threshold_checkpoint(checkpoint: str, data_path: str, out: str | Path, *,
                         version: str = "v1", studies: int = 1, examples: int = 256,
                         phis: tuple[float, ...] = threshold_lib.DEFAULT_PHIS,
                         random_draws: int = 3, seed: int = 0, which: str = "best",
                         combine: str = "max",
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the threshold study of ``checkpoint`` on the last ``studies`` studies of
    ``data_path`` (``version`` images) and writes its files into ``out``."""
    params, batch_stats, config = ckpt_lib.load(checkpoint, which)
    batch = held_out_batch(data_path, version, studies, scale=config.data.intensity_scale,
                           patch_size=config.data.patch_size, examples=examples, seed=seed)
    model = model_from_config(config.model)
    topology = model_graph(model, {"params": params, "batch_stats": batch_stats},
                           config.data.patch_size)

    @jax.jit
    def apply(p: Any) -> tuple[jax.Array, jax.Array]:
        y = model.apply({"params": p, "batch_stats": batch_stats}, batch["inputs"])
        return jnp.mean(jnp.square(y - batch["targets"])), y

    def evaluate(p: Any) -> tuple[float, np.ndarray]:
        loss, y = apply(p)
        return float(loss), np.asarray(y)

    t = config.get("tgd")
    alpha, k = (t.alpha, t.k) if t is not None else (1.0, 5)
    result = threshold_lib.threshold_study(
        params, topology, evaluate, batch["inputs"], phis=phis, alpha=alpha, k=k,
        key=jax.random.key(seed), random_draws=random_draws, combine=combine)
    result.update(checkpoint=str(checkpoint), data=str(data_path), version=version,
                  held_out_studies=studies, examples=examples, seed=seed, combine=combine,
                  model=config.model.get("name", "dncnn"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json(out / "threshold.json", result)
    threshold_figure(result, out / "threshold.png")
    scores = masks_lib.layer_scores(params, topology, alpha=alpha, k=k, combine=combine)
    kse_figure(scores, out / "kse_hist.png", phi=0.3)
    for row in result["rows"]:
        log(f"phi {row['phi']:.1f}: {100 * row['fraction']:.1f} % dropped; held-out loss "
            f"KSE {row['kse']['loss']:.4g}, random {row['random']['loss']:.4g}, "
            f"L1 {row['l1']['loss']:.4g} (intact {result['intact_loss']:.4g})")
    return result


def threshold_figure(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Fraction dropped vs phi (with the paper's), and held-out loss vs phi per choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    phis = [r["phi"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    a.plot(phis, [100 * r["fraction"] for r in rows], "o-", color="k", label="this network")
    paper = threshold_lib.PAPER_FRACTIONS
    a.plot(list(paper), [100 * v for v in paper.values()], "s--", color="0.6", label="paper")
    a.set(xlabel="phi", ylabel="parameters dropped (%)", ylim=(0, 100))
    a.legend(fontsize=7)
    for name, style in (("kse", "o-"), ("random", "^--"), ("l1", "s:")):
        b.plot(phis, [r[name]["loss"] for r in rows], style, label=name.upper()
               if name != "random" else "random (same counts)")
    b.axhline(result["intact_loss"], color="k", lw=0.8, label="intact")
    b.set(xlabel="phi", ylabel="held-out MSE, kernels zeroed", yscale="log")
    b.legend(fontsize=7)
    fig.suptitle(title or "Threshold study: zero the kernels with KSE < phi", fontsize=9)
    fig.tight_layout()
    workdir_lib.save_figure(fig, path)


def kse_figure(scores: dict[str, Any], path: Path, phi: float, title: str = "") -> None:
    """One histogram of KSE per layer (output channels rated by their consumer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(scores)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers), 2.2), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        values = np.asarray(scores[layer])
        ax.hist(values, bins=20, range=(0, 1), color="0.4")
        ax.axvline(phi, color="r", lw=1)
        ax.set_title(f"{layer} ({int((values < phi).sum())}/{values.size} < {phi})", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title or f"KSE per output channel (rated by its consumer), phi = {phi}",
                 fontsize=8)
    workdir_lib.save_figure(fig, path)
