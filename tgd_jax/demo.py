r"""Smallest end-to-end TGD run: pretrain a DnCNN on one noise texture, adapt it to another.

A stand-in for the paper's v1 -> v2 experiment that needs no dataset (it runs until the
simulator-based pipeline replaces it): clean 2.5D images are smooth random blobs (3
correlated slices). Task A ("v1") adds spatially correlated noise (coarse texture) at
noise levels from low to high, like the paper's mixed-BMI v1 training set; task B ("v2")
adds white noise (fine texture) at LOW levels only, like the paper's 7 low-BMI fine-tuning
studies. The network is pretrained on A, then fine-tuned on B by plain fine-tuning and by
TGD in both modes, and every network is evaluated on the new task (B, low noise) and on
what it should not forget (A, high noise).

    python -m tgd_jax.demo --workdir runs/demo

Writes config.json, versions.json, metrics.jsonl, tgd_mask.json, summary.json,
kse_histogram.png and examples.png into the workdir.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from tgd_jax import masks as masks_lib
from tgd_jax import optim, step, workdir
from tgd_jax.models import DnCNN

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Directory for everything the run writes.")
flags.DEFINE_integer("seed", 0, "PRNG seed for data, initialisation and sampling.")
flags.DEFINE_integer("size", 32, "Patch size in pixels (the paper uses 32 x 32 patches).")
flags.DEFINE_integer("batch_size", 8, "Patches per step.")
flags.DEFINE_float("width_multiplier", 0.25, "DnCNN width multiplier (1.0 = paper widths).")
flags.DEFINE_integer("pretrain_steps", 400, "Steps of training on task A.")
flags.DEFINE_integer("finetune_steps", 150, "Steps of fine-tuning on task B, per method.")
flags.DEFINE_float("phi", 0.3, "KSE threshold: channels scoring below it are retrained.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (the paper's).")
flags.DEFINE_integer("eval_patches", 64, "Held-out patches per task for evaluation.")


def clean_slices(key: jax.Array, n: int, size: int) -> jax.Array:
    """``(n, size, size, 3)`` smooth random images: 6 Gaussian blobs varying across slices."""
    k_pos, k_amp, k_width, k_drift = jax.random.split(key, 4)
    yy, xx = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
    centres = jax.random.uniform(k_pos, (n, 6, 2), minval=0, maxval=size)
    amps = jax.random.uniform(k_amp, (n, 6), minval=0.2, maxval=1.0)
    widths = jax.random.uniform(k_width, (n, 6), minval=1.0, maxval=size / 5)
    drift = 1.0 + 0.15 * jax.random.normal(k_drift, (n, 6, 3))  # slice-to-slice change
    d2 = (yy[None, None] - centres[..., 0, None, None]) ** 2 + (
        xx[None, None] - centres[..., 1, None, None]
    ) ** 2
    blobs = amps[..., None, None] * jnp.exp(-d2 / (2 * widths[..., None, None] ** 2))
    return jnp.einsum("nbhw,nbs->nhws", blobs, drift)


def add_noise(key: jax.Array, clean: jax.Array, sigma: jax.Array, correlated: bool) -> jax.Array:
    """Task A: noise smoothed by a 3x3 box (coarse texture); task B: white noise."""
    noise = jax.random.normal(key, clean.shape)
    if correlated:
        box = jnp.ones((3, 3, 1, 1)) / 3.0  # unit variance after smoothing 9 pixels
        flat = jnp.moveaxis(noise, -1, 0)[..., None].reshape(-1, *clean.shape[1:3], 1)
        smooth = jax.lax.conv_general_dilated(
            flat, box, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        noise = jnp.moveaxis(smooth.reshape(3, *clean.shape[:3]), 0, -1)
    return clean + sigma * noise


#: task -> (correlated noise?, lowest and highest noise standard deviation).
TASKS = {
    "A": (True, 0.05, 0.4),  # pretraining: coarse texture, all noise levels
    "B": (False, 0.05, 0.15),  # fine-tuning: fine texture, low noise only
    "A_high": (True, 0.35, 0.4),  # evaluation: the old task's hardest cases
    "B_low": (False, 0.1, 0.1),  # evaluation: the new task
}


@functools.partial(jax.jit, static_argnames=("n", "size", "task"))
def make_batch(key: jax.Array, n: int, size: int, task: str) -> dict[str, jax.Array]:
    """``{"inputs", "targets"}``, each ``(n, size, size, 3)``, of one task."""
    correlated, lo, hi = TASKS[task]
    k_img, k_sigma, k_noise = jax.random.split(key, 3)
    clean = clean_slices(k_img, n, size)
    sigma = jax.random.uniform(k_sigma, (n, 1, 1, 1), minval=lo, maxval=hi)
    return {"inputs": add_noise(k_noise, clean, sigma, correlated), "targets": clean}


def train(
    state: step.TrainState,
    step_fn: Callable[..., Any],
    key: jax.Array,
    steps: int,
    task: str,
    log: Callable[[dict[str, Any]], None],
    name: str,
) -> step.TrainState:
    t0 = time.perf_counter()
    for i in range(steps):
        batch = make_batch(jax.random.fold_in(key, i), FLAGS.batch_size, FLAGS.size, task)
        state, metrics = step_fn(state, batch)
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            loss = float(metrics["loss"])
            rate = (i + 1) / (time.perf_counter() - t0)
            logging.info(
                "%-14s step %4d/%d  loss %.5f  %.1f steps/s  ETA %.0f s",
                name, i + 1, steps, loss, rate, (steps - i - 1) / rate,
            )
            log({"run": name, "step": i + 1, "loss": loss, "steps_per_s": rate})
    return state


def main(argv: list[str]) -> None:
    del argv
    out = Path(FLAGS.workdir)
    config = {name: FLAGS[name].value for name in (
        "seed", "size", "batch_size", "width_multiplier", "pretrain_steps", "finetune_steps",
        "phi", "learning_rate", "eval_patches")}
    masks_lib.check_phi(FLAGS.phi)
    workdir.write_json(out / "config.json", config)
    workdir.write_json(out / "versions.json", workdir.versions())
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    def log(record: dict[str, Any]) -> None:
        workdir.append_jsonl(metrics_path, record)

    key = jax.random.key(FLAGS.seed)
    k_init, k_pre, k_ft, k_eval = jax.random.split(key, 4)
    model = DnCNN(width_multiplier=FLAGS.width_multiplier, use_gates=True)
    variables = model.init(k_init, jnp.zeros((1, FLAGS.size, FLAGS.size, 3)), train=False)
    variables = {k: v for k, v in variables.items() if k != "tgd"}
    eval_sets = {
        task: make_batch(jax.random.fold_in(k_eval, i), FLAGS.eval_patches, FLAGS.size, task)
        for i, task in enumerate(("A_high", "B_low"))
    }
    evaluate = jax.jit(functools.partial(step.eval_step, model=model))

    def scores(state: step.TrainState) -> dict[str, float]:
        return {f"mse_{t}": float(evaluate(state, b)["loss"]) for t, b in eval_sets.items()}

    # 1. Pretrain on task A ("v1-net").
    tx = optax.adam(FLAGS.learning_rate)
    state = step.create_train_state(variables, tx)
    step_fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
    pretrained = train(state, step_fn, k_pre, FLAGS.pretrain_steps, "A", log, "pretrain(A)")
    results = {"pretrained on A": scores(pretrained), "noisy input": {
        f"mse_{t}": float(step.mse(b["inputs"], b["targets"])) for t, b in eval_sets.items()}}

    # 2. KSE masks on the pretrained network.
    base = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
    topology = model.topology()
    runs: dict[str, tuple[optax.GradientTransformation, Any]] = {
        "full fine-tune": (optax.adam(FLAGS.learning_rate), None)}
    for mode in ("paper", "projected"):
        tgd_masks = masks_lib.tgd_masks(base["params"], topology, FLAGS.phi, mode=mode)
        runs[f"TGD ({mode})"] = (
            optim.tgd(optax.adam(FLAGS.learning_rate), tgd_masks.params), tgd_masks.gates)
    summary = masks_lib.mask_summary(
        base["params"], tgd_masks.params, topology, scores=tgd_masks.scores, phi=FLAGS.phi)
    workdir.write_json(out / "tgd_mask.json", summary)
    logging.info("TGD retrains %.1f %% of the parameters at phi = %.2f",
                 100 * summary["retrained_fraction"], FLAGS.phi)

    # 3. Fine-tune on task B with each method, from the same pretrained network.
    finals = {}
    for name, (tx, gates) in runs.items():
        state = step.create_train_state(base, tx, gates=gates)
        step_fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
        finals[name] = train(state, step_fn, k_ft, FLAGS.finetune_steps, "B", log, name)
        results[name] = scores(finals[name])

    report = {"results": results, "retrained_fraction": summary["retrained_fraction"],
              "phi": FLAGS.phi}
    workdir.write_json(out / "summary.json", report)
    _figures(out, summary, eval_sets["B_low"], {"pretrained on A": pretrained, **finals}, model)
    lines = [f"{'network':<18}{'MSE A (old, high noise)':>25}{'MSE B (new, low noise)':>25}"]
    lines += [f"{k:<18}{v['mse_A_high']:>25.5f}{v['mse_B_low']:>25.5f}" for k, v in results.items()]
    print("\n".join(lines))
    print(f"TGD retrained fraction: {100 * summary['retrained_fraction']:.1f} % "
          f"of parameters (phi = {FLAGS.phi}); outputs in {out}/")


def _figures(out: Path, summary: dict[str, Any], batch: dict[str, jax.Array],
             states: dict[str, step.TrainState], model: DnCNN) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [entry for entry in summary["layers"] if "kse" in entry]
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.4), sharey=False)
    for ax, entry in zip(np.atleast_1d(axes), layers, strict=True):
        ax.hist(entry["kse"], bins=20, range=(0, 1), color="tab:blue")
        ax.axvline(summary["phi"], color="tab:red", linestyle="--")
        ax.set_title(f"{entry['layer']}: {entry['channels_retrained']}/"
                     f"{entry['channels_total']} retrained", fontsize=8)
        ax.set_xlabel("KSE", fontsize=8)
    fig.suptitle(f"KSE of each layer's output channels (phi = {summary['phi']})", fontsize=9,
                 y=1.08)
    workdir.save_figure(fig, out / "kse_histogram.png")

    panels = {"noisy (B, low)": batch["inputs"][0, ..., 1], "clean": batch["targets"][0, ..., 1]}
    for name, state in states.items():
        v = {"params": state.params, "batch_stats": state.batch_stats}
        panels[name] = model.apply(v, batch["inputs"][:1], train=False)[0, ..., 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4))
    for ax, (name, image) in zip(axes, panels.items(), strict=True):
        ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    workdir.save_figure(fig, out / "examples.png")


if __name__ == "__main__":
    app.run(main)
