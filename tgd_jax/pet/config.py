"""Experiment configs (ml_collections), shared by ``train.py``, ``finetune.py`` and ``online.py``.

The files in ``configs/`` call these builders, so every command has one documented set of
fields, overridable from the command line (``--config.optimizer.learning_rate=3e-4``).
A config string after the file selects a size preset (``--config=configs/train.py:tiny``):

* ``paper``: the paper's DnCNN (64..256 channels), 32 x 32 patches, Adam 1e-3, 500 epochs.
* ``demo``: a quarter-width DnCNN and fewer steps, for the CPU demo (``make demo``).
* ``tiny``: a few hundred parameters and a handful of steps, for the test suite.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from tgd_jax import methods
from tgd_jax.io.errors import UsageError
from tgd_jax.pet import data as data_lib
from tgd_jax.pet import models
from tgd_jax.rule import TGDRule
from tgd_jax.train.step import LOSSES

__all__ = ["base_config", "train_config", "finetune_config", "online_config", "PRESETS",
           "apply_preset", "override", "validate", "PRESET_FIELDS",
           "ADDED_FIELDS"]


def base_config() -> ml_collections.ConfigDict:
    """Fields every command shares."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init and data sampling: batches are a pure function of (seed, step)

    c.model = ml_collections.ConfigDict()
    c.model.name = "dncnn"  # dncnn (the paper's) | unet (2.5D UNet) | resnet (residual)
    c.model.features = (64, 64, 128, 128, 128, 256, 256, 3)  # dncnn: the paper's widths
    c.model.unet_features = (64, 128, 256)  # unet: widths per level (the last: bottleneck)
    c.model.resnet_width = 64  # resnet: the residual stream's width
    c.model.resnet_blocks = 4  # resnet: residual blocks
    c.model.width_multiplier = 1.0  # scales every width (demo: 0.25)
    c.model.bn_momentum = 0.9

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # HDF5 dataset written by `python -m tgd_jax.sim`
    c.data.version = "v1"  # reconstruction version whose images are used
    c.data.val_studies = 1  # last N studies held out for validation (0: fixed training patches)
    c.data.patch_size = 32  # the paper trains on 32 x 32 x 3 patches
    c.data.augment = True  # random flips and 90-degree rotations (the 8 dihedral transforms)
    c.data.intensity_scale = 1.0  # images are multiplied by this before the network (SUV units)
    c.data.target = "target"  # training target: target (the 600 s image) | noiseless (the
    # simulator's noise-free reconstruction, a ceiling no scanner gives; a file simulated
    # with --noiseless); the held-out loss stays against the 600 s image
    c.data.hot_fraction = 0.0  # share of patches drawn to hold a hot voxel (the top 1 % of
    # its target volume: organs, lesions, nodes); 0: uniform positions
    c.data.prefetch = 2  # batches prepared ahead on a background thread

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # adam | adamw | sgd
    c.optimizer.learning_rate = 1e-3  # the paper's Adam learning rate
    c.optimizer.l2 = 0.0  # coupled L2 on conv kernels (the paper's regulariser R): l2 * w is
    # added to the gradient BEFORE the optimizer, as a Keras kernel_regularizer would;
    # train_config sets the pretraining default (docs/premise/premise.md)
    c.optimizer.l2_sp = 0.0  # coupled L2 of the kernels toward the STARTING weights (L2-SP;
    # fine-tuning: the pretrained network), added to the gradient like l2
    c.optimizer.weight_decay = 0.0  # adamw only (decoupled; masked too under TGD)
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.schedule = "constant"  # constant | cosine
    c.optimizer.warmup_steps = 0  # linear warm-up from 0 to learning_rate over these steps
    c.optimizer.decay_fraction = 1.0  # cosine: decays over this share of the steps, then
    c.optimizer.final_lr_fraction = 0.0  # holds at this fraction of the peak rate
    c.optimizer.grad_clip = 0.0  # global-norm clipping; 0 disables

    c.loss = "mse"  # mse (the paper) | mae; also the validation loss
    c.batch_size = 32  # GLOBAL batch, split over all devices (must divide evenly)
    c.num_epochs = 500.0  # one epoch = as many patches as tile the training pairs once
    c.num_steps = 0  # > 0 overrides num_epochs
    c.log_every = 50  # steps between metric records / progress lines
    c.eval_every = 500  # steps between validation + checkpoint
    c.eval_batches = 4  # fixed validation batches
    c.keep_checkpoints = 3  # the last N are kept, plus the best on validation loss
    c.keep_steps = ()  # steps validated and checkpointed for good in <workdir>/kept/<step>
    # (e.g. log-spaced, to study the network along training); any subset of 1..num_steps
    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    return c


#: Fields added after workdirs were first written, with the value that behaves as the code
#: did before them: a workdir whose config.json lacks one resumes when it is left at that
#: value (:func:`tgd_jax.io.workdir.prepare_workdir`). A new field goes here.
ADDED_FIELDS: dict[str, Any] = {
    "optimizer.decay_fraction": 1.0,
    "optimizer.final_lr_fraction": 0.0,
    "optimizer.l2_sp": 0.0,
    "optimizer.warmup_steps": 0,
    "data.target": "target",
    "data.hot_fraction": 0.0,
}


def override(c: ml_collections.ConfigDict, **values: object) -> ml_collections.ConfigDict:
    """Sets fields by dotted name, ``override(c, **{"tgd.phi": 0.4})``; None values are skipped."""
    for path, value in values.items():
        if value is None:
            continue
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


#: The config presets (``--config=configs/<command>.py:<preset>``), as data: for each, the
#: dotted fields every command changes (``"all"``), then each command's own changes (the
#: demo lengths: see docs/premise/premise.md), applied with :func:`override` on top of the
#: command's defaults (``paper`` is the defaults themselves).
PRESET_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "demo": {
        "all": {  # a quarter-width DnCNN, sized for a CPU
            "model.width_multiplier": 0.25, "batch_size": 16, "num_epochs": 0.0,
            "num_steps": 600, "log_every": 50, "eval_every": 200},
        "train": {"num_steps": 1200, "eval_every": 400, "eval_batches": 16},
        "finetune": {"num_steps": 300, "eval_every": 50, "eval_batches": 16},
        "online": {"num_steps": 200, "eval_every": 100},
    },
    "tiny": {
        "all": {  # a few hundred parameters and a handful of steps, for the test suite
            "model.features": (8, 8, 8, 3), "model.unet_features": (4, 6, 8),
            "model.resnet_width": 6, "model.resnet_blocks": 2, "data.patch_size": 16,
            "batch_size": 4, "num_epochs": 0.0, "num_steps": 12, "log_every": 2,
            "eval_every": 4, "eval_batches": 1, "data.prefetch": 1},
    },
}
#: The presets' names.
PRESETS = tuple(PRESET_FIELDS)


def apply_preset(c: ml_collections.ConfigDict, preset: str, command: str = ""
                 ) -> ml_collections.ConfigDict:
    """Applies preset ``preset`` ("" = ``paper``): its fields for every command, then
    ``command``'s own."""
    preset = preset or "paper"
    if preset not in PRESET_FIELDS:
        raise UsageError(f"unknown config preset {preset!r}; have {PRESETS}")
    fields = PRESET_FIELDS[preset]
    override(c, **fields.get("all", {}))
    return override(c, **fields.get(command, {}))


#: The pretraining recipe chosen by experiments/premise.py (docs/premise/premise.md).
PRETRAIN_L2 = 1e-2
PRETRAIN_SCHEDULE = "cosine"


def train_config(preset: str = "") -> ml_collections.ConfigDict:
    """``train.py``: a DnCNN from scratch on one version (v1-net, v2-net).

    Pretraining uses coupled L2 on the kernels and a cosine schedule to a settled minimum:
    the recipe chosen on held-out loss and the threshold study (docs/premise/premise.md).
    """
    c = base_config()
    c.data.path = "runs/demo/data/train.h5"
    c.optimizer.l2 = PRETRAIN_L2
    c.optimizer.schedule = PRETRAIN_SCHEDULE
    return apply_preset(c, preset, "train")


def finetune_config(preset: str = "") -> ml_collections.ConfigDict:
    """``finetune.py``: FT-net / TGD-net and the ablations, from a pretrained checkpoint."""
    c = base_config()
    c.data.path = "runs/demo/data/finetune.h5"
    c.data.version = "v2"
    c.data.val_studies = 0  # the paper fine-tunes on only 7 studies: keep them all
    c.checkpoint = ""  # workdir or checkpoint folder of the network to start from
    c.checkpoint_which = "best"  # best | latest | <step>
    c.method = "tgd"  # tgd | last_k | full | random | l1 | packnet
    c.optimizer.learning_rate = 1e-4  # chosen at demo scale over the paper's 1e-3
    # (docs/premise/premise.md)
    c.tgd = tgd_section(phi=0.3)
    c.last_k = 3  # last_k: conv blocks fine-tuned from the end (the paper's FT-net: 3)
    c.freeze_batch_stats = True  # keep the BatchNorm running statistics of frozen channels
    c.validation = held_out_section(version="")  # new-task held-out set ("" path: see
    # data.val_studies; "" version: data.version); chooses the best checkpoint
    c.old_task = held_out_section(version="v1")  # old-task held-out set, to measure
    # forgetting ("" path: none); logged as val_loss_old
    return apply_preset(c, preset, "finetune")


def online_config(preset: str = "") -> ml_collections.ConfigDict:
    """``online.py``: noise-2-noise TGD on ONE study (TGD_N2N-net, TGD^2_N2N-net)."""
    c = finetune_config()
    c.data.path = "runs/demo/data/online.h5"
    c.data.study = ""  # study group to learn on ("" = the first)
    c.data.val_studies = 0
    c.num_epochs = 150.0  # the paper's online-learning epochs
    c.tgd.phi = 0.4  # the paper's threshold for N2N online learning
    c.optimizer.learning_rate = 1e-3  # the paper's (online learning was not re-measured)
    return apply_preset(c, preset, "online")


def tgd_section(phi: float) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.phi = phi  # KSE threshold: channels scoring below it are retrained
    t.alpha = 1.0  # KSE entropy weight
    t.k = 5  # KSE nearest neighbours
    t.first = "kse"  # conv1 policy: kse | frozen | train (the paper leaves this open)
    t.last = "frozen"  # last conv ("noise classifier"): frozen (the paper) | train
    t.mode = "projected"  # projected (update mask only; chosen in docs/premise/premise.md) |
    # paper (the paper's gated backward pass)
    t.frozen_bn = "running"  # BatchNorm of frozen channels in training passes: running (their
    # running statistics, as at inference: the network trained is the one evaluated) | batch
    t.retrained_bn = "batch"  # BatchNorm of retrained channels: batch | running (with
    # frozen_bn=running: every BatchNorm in inference mode, no statistic changes)
    t.combine = "max"  # a map read by several layers: max | mean | min of their KSE values
    # (docs/method.md, "graphs"; sequential networks: one reader, the same for all three)
    t.other = "frozen"  # parameters of no channel (a learned scalar, an embedding): frozen |
    # train
    t.readers = "none"  # also retrain the input slices of frozen filters that read retrained
    # maps: none | all | last (the last layer only); projected mode (docs/method.md, 11)
    t.reinit_scale = 0.0  # > 0: re-draw what is retrained (He-normal x scale; BatchNorm and
    # biases reset) before training; 0 keeps the pretrained values (the paper)
    t.packnet_fraction = 0.5  # method packnet: the fraction of each kernel freed
    t.gate_cosine = False  # log the cosine between the gated and the true gradient (costs
    # one more backward pass per step)
    return t


def held_out_section(version: str) -> ml_collections.ConfigDict:
    h = ml_collections.ConfigDict()
    h.path = ""  # HDF5 dataset; its LAST `studies` studies are used
    h.version = version
    h.studies = 1
    return h


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field a command reads, once, before anything is read or written.

    Fine-tuning fields (``tgd``, ``method``, ``checkpoint``, ...) are checked when the config
    has them. Returns ``c`` unchanged.

    Raises:
      UsageError: listing every bad field as ``config.<field>: <problem>, got <value>``.
    """

    problems: list[str] = []

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            value = c
            for part in field.split("."):
                value = value[part]
            problems.append(f"config.{field} {rule}, got {value!r}")

    def positive(field: str, value: Any) -> None:
        need(isinstance(value, int | float) and 0 < value < float("inf"), field,
             "must be finite and > 0")

    def one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
        need(value in allowed, field, f"must be one of {allowed}")

    for field in ("batch_size", "log_every", "eval_every", "eval_batches", "keep_checkpoints",
                  "data.patch_size", "data.intensity_scale", "optimizer.learning_rate"):
        node = c
        for part in field.split("."):
            node = node[part]
        positive(field, node)
    need(c.num_steps > 0 or c.num_epochs > 0, "num_steps",
         "must be > 0, or num_epochs > 0")
    need(isinstance(c.num_epochs, int | float) and 0 <= c.num_epochs < float("inf"),
         "num_epochs", "must be finite and >= 0")
    need(isinstance(c.num_steps, int) and c.num_steps >= 0, "num_steps",
         "must be a whole number >= 0")
    need(isinstance(c.seed, int) and not isinstance(c.seed, bool) and c.seed >= 0, "seed",
         "must be a whole number >= 0 (it seeds the PRNG keys and the data)")
    need(c.num_steps <= 0 or all(isinstance(s, int) and s <= c.num_steps
                                 for s in c.keep_steps),
         "keep_steps", "must lie within 1..num_steps (a step never reached is never kept)")
    m = c.model
    for field in ("features", "unet_features"):
        need(len(m[field]) > 0 and all(isinstance(f, int) and not isinstance(f, bool)
                                      and f > 0 for f in m[field]),
             f"model.{field}", "must be positive channel counts")
    for field in ("resnet_width", "resnet_blocks"):
        need(isinstance(m[field], int) and m[field] > 0, f"model.{field}",
             "must be a whole number > 0")
    positive("model.width_multiplier", m.width_multiplier)
    need(isinstance(m.bn_momentum, int | float) and 0 <= m.bn_momentum < 1,
         "model.bn_momentum", "must be in [0, 1)")  # NaN fails too
    need(isinstance(c.optimizer.momentum, int | float) and 0 <= c.optimizer.momentum < 1,
         "optimizer.momentum", "must be in [0, 1)")
    need(bool(c.data.path), "data.path", "must name an HDF5 dataset")
    need(bool(c.data.version), "data.version", "must name a reconstruction version")
    need(all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in c.keep_steps),
         "keep_steps", "must be positive step numbers")
    need(c.data.val_studies >= 0, "data.val_studies", "must be >= 0")
    need(c.data.prefetch >= 1, "data.prefetch", "must be >= 1")
    one_of("model.name", c.model.name, tuple(models.MODELS))
    one_of("loss", c.loss, tuple(LOSSES))
    one_of("optimizer.name", c.optimizer.name, ("adam", "adamw", "sgd"))
    one_of("optimizer.schedule", c.optimizer.schedule, ("constant", "cosine"))
    need(0 < c.optimizer.decay_fraction <= 1, "optimizer.decay_fraction",
         "must be in (0, 1]")  # NaN fails too
    need(0 <= c.optimizer.final_lr_fraction < 1, "optimizer.final_lr_fraction",
         "must be in [0, 1)")
    need(isinstance(c.optimizer.warmup_steps, int) and c.optimizer.warmup_steps >= 0
         and (c.num_steps <= 0 or c.optimizer.warmup_steps < c.num_steps),
         "optimizer.warmup_steps", "must be a whole number >= 0 and below num_steps")
    need(not (c.optimizer.schedule == "cosine" and c.num_steps > 0
              and isinstance(c.optimizer.warmup_steps, int)
              and c.optimizer.warmup_steps > 0 and isinstance(c.optimizer.decay_fraction,
                                                              int | float)
              and c.optimizer.warmup_steps >= round(c.optimizer.decay_fraction
                                                    * c.num_steps)),
         "optimizer.warmup_steps", "must be below the cosine's decay steps (num_steps x "
         "optimizer.decay_fraction)")
    need(c.data.target == "target" or c.data.val_studies > 0
         or bool(c.get("validation") and c.validation.path), "data.target",
         "'noiseless' needs held-out studies (data.val_studies > 0), whose loss stays "
         "against the 600 s image; without them the best checkpoint would be chosen on "
         "the noiseless training targets")
    one_of("data.target", c.data.target, data_lib.TARGETS)
    need(isinstance(c.data.hot_fraction, int | float) and 0 <= c.data.hot_fraction <= 1,
         "data.hot_fraction", "must be in [0, 1]")
    for field in ("l2", "l2_sp", "weight_decay", "grad_clip"):
        need(c.optimizer[field] >= 0, f"optimizer.{field}", "must be >= 0")  # NaN fails
    need(not c.optimizer.weight_decay or c.optimizer.name == "adamw", "optimizer.weight_decay",
         "is decoupled weight decay, which only optimizer.name='adamw' applies")
    if "tgd" in c:
        t = c.tgd
        one_of("method", c.method, tuple(methods.SELECTORS))
        # the section is a TGDRule's fields: the rule names every bad one
        for field in sorted(set(t) - set(TGDRule.fields())):
            problems.append(f"config.tgd.{field} is not a field of tgd_jax.TGDRule "
                            f"{TGDRule.fields()}")
        for field, problem in TGDRule.problems(t):
            need(False, f"tgd.{field}", problem)
        # L2-SP's anchor is the network the optimizer starts from: re-drawn weights would
        # pull toward noise, not toward the pretrained network
        need(not (c.optimizer.l2_sp and (t.reinit_scale > 0 or c.method == "packnet")),
             "optimizer.l2_sp", "pulls toward the starting weights, which re-initialisation "
             "(tgd.reinit_scale > 0, method packnet) replaces; use one or the other")
        positive("last_k", c.last_k)
        need(bool(c.checkpoint), "checkpoint",
             "must name the network to start from (--config.checkpoint=runs/v1net)")
        for section in ("validation", "old_task"):
            if section in c and c[section].path:
                positive(f"{section}.studies", c[section].studies)
    if problems:
        raise UsageError("bad config: " + "; ".join(problems))
    return c
