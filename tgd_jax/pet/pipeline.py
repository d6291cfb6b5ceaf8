"""The three experiments behind ``train.py``, ``finetune.py`` and ``online.py``, as functions.

Each takes a config (see :mod:`tgd_jax.pet.config`) and a workdir, writes everything into the
workdir (``config.json``, ``versions.json``, ``metrics.jsonl``, checkpoints, ``summary.json``
and, for fine-tuning, ``mask.json`` BEFORE training starts) and returns the summary. Calling
one again on the same workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tgd_jax import methods as methods_lib
from tgd_jax import optim
from tgd_jax.errors import UsageError
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import data as data_lib
from tgd_jax.pet import premise as premise_lib
from tgd_jax.pet import training
from tgd_jax.pet.denoise import denoise_volume, read_volume, write_h5
from tgd_jax.pet.models import model_from_config, model_graph
from tgd_jax.rule import TGDRule
from tgd_jax.train import checkpoints as ckpt_lib
from tgd_jax.train import parallel
from tgd_jax.train import step as step_lib

__all__ = ["train", "finetune", "online", "initial_variables", "num_steps_for"]

Log = Callable[[str], None]


def num_steps_for(config: ml_collections.ConfigDict, pairs: data_lib.PairSet) -> int:
    """``num_steps`` if set, else ``num_epochs`` epochs (:func:`data.steps_per_epoch`)."""
    if config.num_steps > 0:
        return int(config.num_steps)
    if config.num_epochs <= 0:
        raise UsageError("set config.num_steps or config.num_epochs to a positive value")
    per_epoch = data_lib.steps_per_epoch(pairs, config.data.patch_size, config.batch_size)
    return max(1, math.ceil(config.num_epochs * per_epoch))


def initial_variables(model: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Fresh variables from ``config.seed`` (the data use the same seed, another stream)."""
    p = config.data.patch_size
    return model.init(jax.random.key(config.seed), jnp.zeros((1, p, p, 3), jnp.float32))


def _supervised_data(config: ml_collections.ConfigDict
                     ) -> tuple[list[str], list[str], data_lib.PairSet, data_lib.PairSet | None]:
    """Training and validation pairs of ``config.data`` (read and validated before the
    workdir is touched, so a wrong path leaves nothing behind)."""
    info = data_lib.open_dataset(config.data.path)
    # Every process reads every study: the batches are drawn from all of them, and each
    # process makes its own rows (tgd_jax.train.trainer.fit).
    train_ids, val_ids = data_lib.split_studies(info.studies, config.data.val_studies)
    path, version, scale = config.data.path, config.data.version, config.data.intensity_scale
    train_pairs = data_lib.supervised_pairs(path, version, train_ids, scale=scale, info=info,
                                            target=config.data.get("target", "target"))
    val_pairs = (data_lib.supervised_pairs(path, version, val_ids, scale=scale, info=info)
                 if val_ids else None)
    held = config.get("validation")
    if held is not None and held.path:
        ids, val_pairs = _held_out(held, held.version or version, scale)
        val_ids = [f"{held.path}:{s}" for s in ids]
    for pairs in (train_pairs, val_pairs):  # studies may differ in size: each must fit
        if pairs is not None:
            pairs.check_patch(config.data.patch_size)
    return train_ids, val_ids, train_pairs, val_pairs


def _held_out(held: ml_collections.ConfigDict, version: str,
              scale: float) -> tuple[list[str], data_lib.PairSet]:
    """The last ``held.studies`` studies of ``held.path`` and their ``version`` pairs."""
    info = data_lib.open_dataset(held.path)  # validated once
    if not 1 <= held.studies <= len(info.studies):
        raise UsageError(f"held-out studies={held.studies} must be in [1, "
                         f"{len(info.studies)}] for {held.path}")
    ids = list(info.studies[-held.studies:])
    return ids, data_lib.supervised_pairs(held.path, version, ids, scale=scale, info=info)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = print,
          mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Trains the config's denoiser from scratch on ``config.data.version`` (v1-net / v2-net)."""
    config_lib.validate(config)
    train_ids, val_ids, train_pairs, val_pairs = _supervised_data(config)
    parallel.process_rows(config.batch_size, mesh or parallel.make_mesh())  # splits evenly?
    workdir = workdir_lib.prepare_workdir(workdir, config, "train",
                                          added_fields=config_lib.ADDED_FIELDS)
    steps = num_steps_for(config, train_pairs)
    model = model_from_config(config.model)
    variables = initial_variables(model, config)
    tx = optim.make_optimizer(num_steps=steps, **config.optimizer)
    state = step_lib.create_train_state(variables, tx)
    log(f"train: {len(train_ids)} studies ({len(train_pairs.pairs)} pairs), "
        f"{len(val_ids)} validation, {config.data.version}, {steps} steps, "
        f"{_count(variables['params']):,} parameters, {jax.device_count()} device(s)")
    _, summary = training.fit_pairs(
        config=config, workdir=workdir, model=model, tx=tx, state=state,
        train_pairs=train_pairs, val_pairs=val_pairs, num_steps=steps,
        meta={"command": "train"}, mesh=mesh, log=log)
    summary.update(command="train", train_studies=train_ids, val_studies=val_ids)
    if _main():
        workdir_lib.write_json(workdir / "summary.json", summary)
    return summary


def _pretrained(config: ml_collections.ConfigDict, log: Log
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Loads ``config.checkpoint``: its variables, its metadata, and the fields to adopt.

    The network's shape is the checkpoint's, whatever the config says, and the images must
    be scaled as in pretraining. The third value holds those fields (dotted name -> value,
    for :func:`tgd_jax.pet.config.override`); the variables are checked against the
    architecture they describe.
    """
    params, batch_stats, source, meta = ckpt_lib.restore(config.checkpoint, config.checkpoint_which)
    log(f"loaded {meta['checkpoint']} (step {meta.get('step')}, validation loss "
        f"{meta.get('val_loss')})")
    adopted: dict[str, Any] = {}
    if "model" in source:
        adopted = {f"model.{k}": tuple(v) if isinstance(v, list | tuple) else v
                   for k, v in source.model.to_dict().items() if k in config.model}
        adopted.setdefault("model.name", "dncnn")  # written before there were several
        adopted["data.intensity_scale"] = source.data.intensity_scale
    model_config = {**config.model.to_dict(),
                    **{k.split(".")[1]: v for k, v in adopted.items() if k.startswith("model.")}}
    variables = {"params": params, "batch_stats": batch_stats}
    # Shapes only (jax.eval_shape): nothing is initialised or computed.
    p = config.data.patch_size
    template = jax.eval_shape(model_from_config(model_config).init, jax.random.key(0),
                              jnp.zeros((1, p, p, 3), jnp.float32))
    ckpt_lib.check_tree_match(template, {k: v for k, v in variables.items() if v},
                              meta["checkpoint"])
    return variables, meta, adopted


def _adopt(config: ml_collections.ConfigDict, adopted: dict[str, Any]
           ) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the checkpoint's fields (``config.json`` shows what ran)."""
    return config_lib.override(ml_collections.ConfigDict(config.to_dict()), **adopted)


def _plan(config: ml_collections.ConfigDict, variables: dict[str, Any],
          train_pairs: data_lib.PairSet) -> dict[str, Any]:
    """Shared by fine-tuning and online learning, before the workdir exists (a refusal
    leaves nothing): the mask plan, the starting variables, the old-task held-out set."""
    t = config.tgd
    train_pairs.check_patch(config.data.patch_size)
    model = model_from_config(config.model)
    graph = model_graph(model, variables, config.data.patch_size)
    plan = methods_lib.plan_finetune(
        config.method, variables["params"], graph, rule=TGDRule(**t),
        batch_stats=variables.get("batch_stats"), last_k=config.last_k,
        key=jax.random.fold_in(jax.random.key(config.seed), 1))
    if t.reinit_scale > 0 or config.method == "packnet":
        # fresh values for what is retrained (PackNet's freed weights: 0 unless a scale is
        # given), then the running statistics of the re-drawn channels estimated on data
        params, stats = methods_lib.reinitialize(
            variables["params"], variables.get("batch_stats", {}), plan,
            jax.random.fold_in(jax.random.key(config.seed), 2), scale=t.reinit_scale)
        variables = {**variables, "params": params, "batch_stats": stats}
        if stats and plan.stats_mask is not None:
            model = model_from_config(config.model)
            batches = [data_lib.sample_batch(
                train_pairs, seed=config.seed, step=i, batch_size=config.batch_size,
                patch_size=config.data.patch_size, augment=False,
                stream=data_lib.STREAM_VAL)["inputs"] for i in range(8)]
            variables["batch_stats"] = step_lib.estimate_statistics(
                model, variables, batches, plan.stats_mask)
    old = config.get("old_task")
    extra_val = ({"old": _held_out(old, old.version, config.data.intensity_scale)[1]}
                 if old is not None and old.path else None)
    return {"model": model, "graph": graph, "plan": plan, "variables": variables,
            "extra_val": extra_val}


def _tgd_run(config: ml_collections.ConfigDict, workdir: Path, command: str,
             planned: dict[str, Any], source_meta: dict[str, Any],
             train_pairs: data_lib.PairSet, val_pairs: data_lib.PairSet | None, log: Log,
             mesh: jax.sharding.Mesh | None) -> tuple[dict[str, Any], Any]:
    """Shared by fine-tuning and online learning: train the :func:`_plan` in ``workdir``."""
    t = config.tgd
    model, graph, plan, variables, extra_val = (
        planned[k] for k in ("model", "graph", "plan", "variables", "extra_val"))
    # Written BEFORE training, so the choice of weights is on disk even if training fails.
    if _main():
        workdir_lib.write_json(workdir / "mask.json", {
            **plan.to_json(), "source_checkpoint": source_meta["checkpoint"]})
        workdir_lib.write_json(workdir / "graph.json", graph.to_json())
        if plan.scores:
            premise_lib.kse_figure(plan.scores, workdir / "kse_hist.png", phi=t.phi)
    reach = plan.summary.get("paper_reach")
    log(f"{command}: method {config.method}, {plan.summary['params_retrained']:,} of "
        f"{plan.summary['params_total']:,} parameters retrained "
        f"({100 * plan.summary['retrained_fraction']:.1f} %)"
        + (f", {reach['params_reached']:,} of them reached by the gradient through the "
           "paper-mode gates" if reach else ""))
    steps = num_steps_for(config, train_pairs)
    tx = plan.optimizer(num_steps=steps, watch=False, **config.optimizer)  # the step
    # applies the plan's gates itself (tested); no host callback in it
    state = step_lib.create_train_state(variables, tx, plan)
    state, summary = training.fit_pairs(
        config=config, workdir=workdir, model=model, tx=tx, state=state,
        train_pairs=train_pairs, val_pairs=val_pairs, num_steps=steps,
        meta={"command": command, "method": config.method}, mesh=mesh, log=log,
        freeze_batch_stats=config.freeze_batch_stats, extra_val=extra_val,
        gate_cosine=bool(t.gate_cosine), graph=plan.graph if plan.auto_gates else None,
        constants={"retrained_fraction": plan.summary["retrained_fraction"]})
    summary.update(command=command, method=config.method,
                   retrained_fraction=plan.summary["retrained_fraction"],
                   params_retrained=plan.summary["params_retrained"],
                   optimizer=config.optimizer.name, learning_rate=config.optimizer.learning_rate,
                   l2_sp=config.optimizer.l2_sp,
                   mode=t.mode, frozen_bn=t.frozen_bn, retrained_bn=t.retrained_bn,
                   readers=t.readers, reinit_scale=t.reinit_scale,
                   source_checkpoint=source_meta["checkpoint"])
    return summary, state


def finetune(config: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = print,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Fine-tunes a checkpoint with ``config.method`` (tgd, last_k, full, random, l1)."""
    config_lib.validate(config)
    variables, source_meta, adopted = _pretrained(config, log)
    config = _adopt(config, adopted)
    train_ids, val_ids, train_pairs, val_pairs = _supervised_data(config)
    planned = _plan(config, variables, train_pairs)
    parallel.process_rows(config.batch_size, mesh or parallel.make_mesh())  # splits evenly?
    workdir = workdir_lib.prepare_workdir(workdir, config, "finetune",
                                          added_fields=config_lib.ADDED_FIELDS)
    summary, _ = _tgd_run(config, workdir, "finetune", planned, source_meta, train_pairs,
                          val_pairs, log, mesh)
    summary.update(train_studies=train_ids, val_studies=val_ids)
    if _main():
        workdir_lib.write_json(workdir / "summary.json", summary)
    return summary


def online(config: ml_collections.ConfigDict, workdir: str | Path, *, log: Log = print,
           mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Noise-2-noise TGD on one study, then denoises its full-count image.

    Writes ``denoised.h5`` (the full-count input, the starting network's output and the
    online-learned network's output) and ``online.png``.
    """
    config_lib.validate(config)
    start_vars, source_meta, adopted = _pretrained(config, log)
    config = _adopt(config, adopted)
    info = data_lib.open_dataset(config.data.path)
    study = config.data.study or info.studies[0]
    pairs = data_lib.n2n_pairs(config.data.path, config.data.version, study,
                               scale=config.data.intensity_scale, info=info)
    planned = _plan(config, start_vars, pairs)
    parallel.process_rows(config.batch_size, mesh or parallel.make_mesh())  # splits evenly?
    workdir = workdir_lib.prepare_workdir(workdir, config, "online",
                                          added_fields=config_lib.ADDED_FIELDS)
    summary, state = _tgd_run(config, workdir, "online", planned, source_meta, pairs, None,
                              log, mesh)
    full, _ = read_volume(config.data.path, study=study, key=f"{config.data.version}/halves/full")
    model = model_from_config(config.model)
    scale = config.data.intensity_scale
    before = denoise_volume(model, start_vars, full, scale=scale)
    after = denoise_volume(model, parallel.host_copy({"params": state.params,
                                                      "batch_stats": state.batch_stats}),
                           full, scale=scale)
    ood = _ood_errors(config.data.path, study, config.data.version,
                      {"input": full, "starting network": before, "online": after})
    if _main():
        with workdir_lib.atomic_path(workdir / "denoised.h5", suffix=".h5") as tmp:
            write_h5(tmp, {"input": full, "pretrained": before, "denoised": after},
                     {"study": study, "source": config.data.path,
                      "checkpoint": config.checkpoint, "version": config.data.version})
        _online_figure(full, before, after, workdir / "online.png")
    for roi, errors in ood.items():
        log(f"RMSE vs noiseless around '{roi}': " + ", ".join(
            f"{name} {value:.4g}" for name, value in errors.items()))
    summary.update(study=study, denoised=str(workdir / "denoised.h5"), ood_rmse=ood)
    if _main():
        workdir_lib.write_json(workdir / "summary.json", summary)
    return summary


OOD_ROIS = ("bladder", "catheter")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """In-plane square dilation of a ``(Z, H, W)`` boolean mask by ``radius`` pixels."""
    out = np.zeros_like(mask, bool)
    padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
    h, w = mask.shape[1:]
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[:, dy:dy + h, dx:dx + w]
    return out


def _ood_errors(path: str, study: str, version: str, images: dict[str, np.ndarray],
                radius: int = 3) -> dict[str, dict[str, float]]:
    """RMSE against the noiseless reconstruction in each OOD feature and ``radius`` pixels
    around it, where hallucinations (rings, halos) show; {} if the file has neither."""
    import h5py

    out: dict[str, dict[str, float]] = {}
    with h5py.File(path, "r") as f:
        g = f[study]
        if f"{version}/noiseless" not in g:
            return out
        reference = g[f"{version}/noiseless"][()]
        for roi in OOD_ROIS:
            if f"rois/{roi}" not in g:
                continue
            region = dilate(g[f"rois/{roi}"][()].astype(bool), radius)
            if region.any():
                out[roi] = {name: float(np.sqrt(np.mean((image[region] - reference[region]) ** 2)))
                            for name, image in images.items()}
    return out


def _main() -> bool:
    """Only the first process writes files (multi-host runs)."""
    return jax.process_index() == 0


def _count(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _online_figure(full: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = full.shape[0] // 2
    body = full[z][full[z] > 0.01 * full[z].max()]
    vmax = 4 * float(np.median(body)) if body.size else float(full[z].max())  # hot OOD
    # features saturate; the window shows the body's noise and any hallucination around them
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, image, title in zip(axes[:3], (full, before, after),
                                ("full-count input", "starting network", "after online TGD"),
                                strict=True):
        ax.imshow(image[z], cmap="gray_r", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    diff = after[z] - before[z]
    limit = float(np.percentile(np.abs(diff), 99.5)) or 1.0
    ax = axes[3]
    shown = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title("after - starting", fontsize=9)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    workdir_lib.save_figure(fig, path)
