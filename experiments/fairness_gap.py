"""Fairness-gap and adversarial robustness of class-wise unlearning (Tran & Woo, seeds 000/001).

    python -m experiments.fairness_gap [--preset quick|smoke|cifar10-resnet50|cifar10-vit]
                                       [--out DIR] [--data-dir DIR] [--models M,..] [--methods M,..]
                                       [--penalty-strength LAMBDA] [--seed S] [--no-progress]

Pipeline, per model of the preset:

1. train the original model (resumable Orbax checkpoints under ``DIR/checkpoints``);
2. forget one class c: D_f = its training samples, D_r = the rest;
3. run Retrain, CF, RL, BS, SalUn, SCRUB, GA and L1-sparse on the full model and restricted to the
   last k blocks (Retrain restricted to the last k blocks is EU-k), plus RL and SalUn with the
   fairness-gap-preserving penalty (:mod:`jaxunlearn.methods.fairness_gap_penalty`, "+FGP");
4. evaluate each model: forget / retain / test accuracy (test = test samples of the retained
   classes), MIA efficacy, the fairness-gap of every normalisation layer on D_r (retained classes),
   FGSM and PGD accuracy on the test samples of the retained classes, wall time, trainable
   parameters, optimizer-state bytes and the compiled memory of one update;
5. test Conjecture 2 (higher fairness-gap <-> more vulnerable): Pearson r across the unlearned
   models between the mean per-layer fairness-gap and FGSM accuracy (negative r supports it).

Outputs in ``DIR``: ``results.json``, ``report.md``, ``summary.csv`` (one row per model and
method), ``fairness_gap_layers.csv`` (one row per model, method and layer),
``fairness_gap_layers_<model>.png`` (per-layer gap, one panel per method) and
``conjecture2_<model>.png`` (gap vs adversarial accuracy). Finished rows are cached under
``DIR/rows`` (keyed by a hash of everything that determines them) and the original and retrained
models are checkpointed every epoch, so an interrupted run resumes where it stopped.

Presets: ``quick`` (default; CPU, offline: scikit-learn digits with a width-8 ResNet-18 and a
3-block SmallViT, 38 trained models, about 12 CPU-minutes on 2 cores; or a CIFAR-10 subset when
``--data-dir`` holds TFDS cifar10), ``smoke`` (a tiny SmallViT, for tests), ``cifar10-resnet50``
and ``cifar10-vit`` (paper scale, accelerators; TFDS cifar10 in ``--data-dir``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jaxunlearn import attacks, checkpoint, data, evaluation, loop, methods, metrics, models
from jaxunlearn.methods import base
from jaxunlearn.methods.fairness_gap_penalty import with_fairness_gap_penalty

METHODS = ("Retrain", "CF", "RL", "BS", "SalUn", "SCRUB", "GA", "L1-sparse")
PENALTY_SUFFIX = "+FGP"
INPUT_RANGE = (0.0, 1.0)  # every image loader returns pixels in [0, 1]
ROWS_VERSION = 2  # part of the row-cache key: bump when what a row holds changes

# ----------------------------------------------------------------------------- presets

_UNLEARN_CPU = {
    "batch_size": 64,
    "epochs": 5,
    "methods": {
        "CF": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4),
        "RL": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-3,
                   forget_batch="proportional"),
        "SalUn": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-3, threshold=0.5,
                      forget_batch="proportional"),
        "BS": dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, eps=0.1,
                   forget_batch=32),
        "SCRUB": dict(optimizer="adam", lr=5e-4, alpha=0.5, gamma=1.0, temperature=2.0,
                      max_epochs=2, forget_batch=64),
        "GA": dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, epochs=3,
                   forget_batch=32),
        "L1-sparse": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, alpha=5e-4),
    },
    "penalty": dict(methods=("RL", "SalUn"), strength=20.0, lr=0.01, target="variances"),
}

# Paper scale: the CPU recipe with the reference's batch size, epochs and small BS/GA rates.
_UNLEARN_PAPER = {
    **_UNLEARN_CPU,
    "batch_size": 128,
    "epochs": 10,
    "methods": {
        **_UNLEARN_CPU["methods"],
        "BS": {**_UNLEARN_CPU["methods"]["BS"], "lr": 1e-5, "forget_batch": 128},
        "SCRUB": {**_UNLEARN_CPU["methods"]["SCRUB"], "max_epochs": 3, "forget_batch": 128},
        "GA": {**_UNLEARN_CPU["methods"]["GA"], "lr": 1e-4, "epochs": 5, "forget_batch": 128},
    },
}

PRESETS = {
    "quick": {
        "data": dict(name="digits"),
        "forget_class": 3,
        "eval": dict(eps=8 / 255, eps_note="8/255 on [0, 1] pixels (digits: x = grey level / 16)",
                     pgd_steps=10, per_channel=False, batch_size=512),
        "models": {
            "resnet18": dict(arch="resnet18", width=8, stem="cifar", last_k=3,
                             train=dict(optimizer="adam", lr=3e-3, epochs=15, batch_size=64,
                                        l2=1e-5)),
            "vit": dict(arch="vit", patch_size=2, depth=3, width=64, heads=4, mlp_dim=128,
                        last_k=2, train=dict(optimizer="adam", lr=2e-3, epochs=20, batch_size=64,
                                             l2=1e-5),
                        # The ViT is far more lr-sensitive (digits, 3-epoch sweeps): BS at 1e-3
                        # collapses it (retain acc. 0.36), at 1e-4 still 0.65, at 2e-5 forget 0.12
                        # / retain 0.96; GA at 1e-3 collapses it (0.18), at 3e-4 forgets nothing
                        # (forget acc. 0.96), at 5e-4 forget 0.03 / retain 0.76.
                        unlearn_overrides={"BS": dict(lr=2e-5), "GA": dict(lr=5e-4)}),
        },
        "unlearn": _UNLEARN_CPU,
        # XLA memory analysis costs one extra compilation per variant; on CPU only for these.
        "memory_analysis": ("Retrain", "CF", "RL", "SCRUB"),
    },
    "smoke": {
        "data": dict(name="digits", max_train=240),
        "forget_class": 3,
        "eval": dict(eps=8 / 255, eps_note="8/255 on [0, 1] pixels", pgd_steps=1,
                     per_channel=False, batch_size=512),
        "models": {
            "vit": dict(arch="vit", patch_size=4, depth=1, width=8, heads=2, mlp_dim=16, last_k=1,
                        train=dict(optimizer="adam", lr=3e-3, epochs=1, batch_size=64, l2=0.0)),
        },
        "unlearn": {**_UNLEARN_CPU, "epochs": 1,
                    "methods": {k: {**v, "epochs": 1, "max_epochs": 1} if k == "SCRUB"
                                else {**v, "epochs": 1}
                                for k, v in _UNLEARN_CPU["methods"].items()}},
        "memory_analysis": (),
    },
    "cifar10-resnet50": {
        "data": dict(name="cifar10"),
        "forget_class": 9,  # truck
        "eval": dict(eps=8 / 255, eps_note="8/255 on [0, 1] pixels", pgd_steps=10,
                     per_channel=True, batch_size=1000),
        "models": {
            "resnet50": dict(arch="resnet50", width=64, stem="cifar", last_k=4,
                             train=dict(optimizer="sgd", lr=0.1, momentum=0.9, epochs=100,
                                        batch_size=128, l2=5e-4)),
        },
        "unlearn": _UNLEARN_PAPER,
        "memory_analysis": METHODS,
    },
    "cifar10-vit": {
        "data": dict(name="cifar10"),
        "forget_class": 9,
        "eval": dict(eps=8 / 255, eps_note="8/255 on [0, 1] pixels", pgd_steps=10,
                     per_channel=True, batch_size=1000),
        "models": {
            "vit": dict(arch="vit", patch_size=4, depth=6, width=192, heads=3, mlp_dim=384,
                        last_k=3, train=dict(optimizer="adam", lr=1e-3, epochs=100,
                                             batch_size=128, l2=5e-5)),
        },
        "unlearn": _UNLEARN_PAPER,
        "memory_analysis": METHODS,
    },
}

# The quick preset on a CIFAR-10 subset (``--data-dir`` given): 32x32x3 inputs, 8/255.
_QUICK_CIFAR = {
    "data": dict(name="cifar10", max_examples=2000),
    "eval": dict(eps=8 / 255, eps_note="8/255 on [0, 1] pixels", pgd_steps=10, per_channel=False,
                 batch_size=512),
    "vit": dict(patch_size=4),
}


def resolve_config(preset: str, data_dir: str | None = None) -> dict:
    """The configuration of a preset (a deep copy), adapted to ``data_dir`` for ``quick``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    if preset == "quick" and data_dir:
        cfg["data"] = dict(_QUICK_CIFAR["data"])
        cfg["eval"] = dict(_QUICK_CIFAR["eval"])
        cfg["models"]["vit"].update(_QUICK_CIFAR["vit"])
    if cfg["data"]["name"] == "cifar10" and not data_dir:
        raise ValueError(f"preset {preset!r} reads CIFAR-10 from TFDS: pass --data-dir DIR with "
                         "cifar10 prepared in the array_record format")
    return cfg


# ----------------------------------------------------------------------------- checks (pure)

def check_attack_eps(eps: float, input_range=INPUT_RANGE) -> float:
    """An L-infinity attack radius must satisfy ``0 < eps <= high - low``."""
    e = float(eps)
    lo, hi = map(float, input_range)
    if not np.isfinite(e) or not 0.0 < e <= hi - lo:
        raise ValueError(f"attack eps={eps} is outside the input range {tuple(input_range)}: it "
                         f"must satisfy 0 < eps <= {hi - lo}")
    return e


def check_forget_class(y, forget_class: int, num_classes: int) -> np.ndarray:
    """Rows of the class to forget; a ValueError if it is out of range or absent from ``y``."""
    c = int(forget_class)
    if not 0 <= c < num_classes:
        raise ValueError(f"forget class {forget_class} is outside [0, {num_classes})")
    return data.forget_class({"y": np.asarray(y)}, c)


def check_norm_layers(model: models.Model, variables, sample_x) -> list[str]:
    """The model's normalisation layers in call order; a ValueError if it exposes none."""
    try:
        names = models.norm_layer_names(model, variables, sample_x)
    except TypeError as e:
        raise ValueError(f"the model's apply does not accept capture_norm=True ({e}); the "
                         "fairness-gap needs normalisation-layer outputs in aux['norm']") from e
    if not names:
        raise ValueError("the model exposes no normalisation outputs (aux['norm'] is empty with "
                         "capture_norm=True), so the fairness-gap cannot be measured; use a model "
                         "with BatchNorm/LayerNorm layers")
    return names


def check_last_k(params, k: int) -> list[str]:
    """The block names of ``params``; ``models.last_k_mask`` raises if k exceeds their number."""
    models.last_k_mask(params, k)
    return models.block_names(params)


# ----------------------------------------------------------------------------- small helpers (pure)

def count_trainable(params, trainable=None) -> int:
    """Number of parameter elements a mask lets move (all of them for ``trainable=None``)."""
    leaves = jax.tree_util.tree_leaves(params)
    if trainable is None:
        return int(sum(np.size(p) for p in leaves))
    masks = jax.tree_util.tree_leaves(trainable)
    if len(masks) != len(leaves):
        raise ValueError("trainable mask does not match the parameters")
    return int(sum(np.size(p) if np.ndim(m) == 0 and bool(m) else
                   (0 if np.ndim(m) == 0 else int(np.count_nonzero(m)))
                   for p, m in zip(leaves, masks)))


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree."""
    return int(sum(np.dtype(l.dtype).itemsize * int(np.prod(np.shape(l)))
                   for l in jax.tree_util.tree_leaves(tree) if hasattr(l, "dtype")))


def optimizer_state_bytes(state) -> int:
    """Optimizer-state bytes of a method state (a wrapped method's inner state included)."""
    if not isinstance(state, base.MethodState):
        return tree_bytes(state)
    inner = state.extra.get("inner") if isinstance(state.extra, dict) else None
    return tree_bytes(state.opt_state) + (optimizer_state_bytes(inner) if inner is not None else 0)


def forget_batch_size(spec, batch_size: int, n_forget: int, n_retain: int) -> int:
    """The forget batch size: an int, or ``"proportional"`` = B |D_f| / |D_r| (at least 2)."""
    if spec == "proportional":
        return max(2, int(round(batch_size * n_forget / max(n_retain, 1))))
    b = int(spec)
    if b < 1:
        raise ValueError(f"forget batch size must be positive, got {spec}")
    return b


def pearson(x, y) -> dict:
    """Pearson r (and its two-sided p-value, scipy) between two equally long sequences."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D sequences of one length, got {x.shape}, {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    from scipy import stats

    r, p = stats.pearsonr(x, y)
    return {"r": float(r), "p": float(p), "n": n}


def gap_summary(gaps: dict[str, float], order: list[str]) -> dict:
    """``gap_mean`` (over layers), ``gap_max`` and ``gap_last`` (the last layer in call order)."""
    vals = np.array([gaps[n] for n in order], np.float64)
    return {"gap_mean": float(vals.mean()), "gap_max": float(vals.max()),
            "gap_last": float(vals[-1])}


def gap_shift(gaps: dict[str, float], reference: dict[str, float], order: list[str]) -> float:
    """Mean over layers of ``|gap_l - gap_l(reference)|``: how far a model moved the per-layer
    fairness-gap profile of the original model (Conjecture 1 asks for 0)."""
    return float(np.mean([abs(gaps[n] - reference[n]) for n in order]))


def variant_name(method: str, k: int | None) -> str:
    """Report label of a method, restricted to the last k blocks when k is given."""
    return method if k is None else f"{method} [last {k}]"


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able configuration (row cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_optimizer(hp: dict, total_steps: int | None = None) -> optax.GradientTransformation:
    """``sgd`` (PyTorch style, weight decay added to the gradient) or ``adam``; cosine decay over
    ``total_steps`` when given (the original-training recipe), constant otherwise."""
    lr = optax.cosine_decay_schedule(hp["lr"], total_steps) if total_steps else hp["lr"]
    wd = float(hp.get("weight_decay", 0.0))
    if hp["optimizer"] == "sgd":
        mom = hp.get("momentum") or None
        tx = optax.sgd(lr, momentum=mom)
    elif hp["optimizer"] == "adam":
        tx = optax.adam(lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {hp['optimizer']!r}")
    return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx


# ----------------------------------------------------------------------------- data and models

def load_dataset(cfg: dict, data_dir: str | None, seed: int, progress: bool) -> data.Dataset:
    d = cfg["data"]
    if d["name"] == "digits":
        ds = data.load_digits(seed=seed)
        if d.get("max_train"):
            perm = data.host_rng((seed, 7)).permutation(len(ds.train["y"]))
            rows = np.sort(perm[:d["max_train"]])
            ds = dataclasses.replace(ds, train=data.take(ds.train, rows))
        return ds
    if d["name"] == "cifar10":
        return data.load_cifar10(data_dir=data_dir, max_examples=d.get("max_examples"), seed=seed,
                                 progress=progress)
    raise ValueError(f"unknown dataset {d['name']!r}")


def build_model(mcfg: dict, input_shape, num_classes: int) -> models.Model:
    """The model of a preset entry (``arch``: resnet18, resnet50 or vit)."""
    arch = mcfg["arch"]
    if arch == "resnet18":
        return models.resnet18(input_shape, num_classes, width=mcfg["width"], stem=mcfg["stem"])
    if arch == "resnet50":
        return models.resnet50(input_shape, num_classes, width=mcfg["width"], stem=mcfg["stem"])
    if arch == "vit":
        return models.small_vit(input_shape, num_classes, patch_size=mcfg["patch_size"],
                                depth=mcfg["depth"], width=mcfg["width"], heads=mcfg["heads"],
                                mlp_dim=mcfg["mlp_dim"])
    raise ValueError(f"unknown architecture {arch!r}")


def class_splits(ds: data.Dataset, forget_class: int) -> dict:
    """Forget / retain (train) and the retained-class and forgotten-class parts of val and test."""
    rows = check_forget_class(ds.train["y"], forget_class, ds.num_classes)
    forget, retain = data.forget_retain_splits(ds.train, rows)
    out = {"forget": forget, "retain": retain}
    for name in ("val", "test"):
        split = getattr(ds, name)
        keep = np.asarray(split["y"]) != forget_class
        out[f"{name}_retain"] = data.take(split, np.flatnonzero(keep))
        if (~keep).any():
            out[f"{name}_forget"] = data.take(split, np.flatnonzero(~keep))
    return out


def init_variables(model: models.Model, key, sample_x) -> dict:
    """``model.init`` compiled as one program (eagerly, every initialiser compiles on its own)."""
    return dict(jax.jit(model.init)(key, jnp.asarray(sample_x)))


def train_model(model: models.Model, tcfg: dict, split: dict, *, key, ckpt_dir: str | None,
                progress: bool, desc: str):
    """Train from scratch with a recipe (cosine-decayed optimizer, L2 in the objective),
    resuming from ``ckpt_dir``. Used for the original model and for Retrain (on D_r).

    Returns:
      ``(variables, seconds, history, tx)``: ``history`` has one row per epoch, including the
      epochs of earlier (interrupted) runs (kept with the checkpoints by :func:`loop.run`), and
      ``seconds`` is the sum of their epoch times (the first includes compilation).
    """
    steps = tcfg["epochs"] * data.num_batches(data.split_size(split), tcfg["batch_size"])
    tx = make_optimizer({**tcfg, "weight_decay": 0.0}, steps)
    variables = init_variables(model, jax.random.fold_in(key, 0), split["x"][:1])
    ck = checkpoint.Checkpointer(ckpt_dir) if ckpt_dir else None
    try:
        variables, _, history = loop.run(methods.train(model.apply, tx, l2=tcfg["l2"]), variables,
                                         {"train": split}, batch_size=tcfg["batch_size"],
                                         epochs=tcfg["epochs"], key=jax.random.fold_in(key, 1),
                                         checkpoints=ck, progress=progress, desc=desc)
    finally:
        if ck is not None:
            ck.close()
    return variables, float(sum(h["seconds"] for h in history)), history, tx


# ----------------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnames=("apply_fn", "attack", "eps", "steps", "input_range"))
def _adv_correct(apply_fn, attack, eps, steps, input_range, variables, x, y, weight, key):
    acc = attacks.adversarial_accuracy(apply_fn, variables, x, y, eps=eps, attack=attack,
                                       weight=weight, input_range=input_range, steps=steps,
                                       key=key, random_start=attack == "pgd")
    return acc * jnp.sum(weight != 0)


def adversarial_accuracy(apply_fn, variables, split: dict, *, attack: str, eps: float,
                         steps: int, batch_size: int, key) -> float:
    """White-box FGSM / PGD accuracy over a split, in padded batches (one compile per model)."""
    n = data.split_size(split)
    index, bw = data.batch_plan(n, min(batch_size, n))
    x, y = np.asarray(split["x"]), np.asarray(split["y"])
    correct = 0.0
    for i in range(index.shape[0]):
        correct += float(_adv_correct(apply_fn, attack, float(eps), int(steps), INPUT_RANGE,
                                      variables, x[index[i]], y[index[i]], bw[i],
                                      jax.random.fold_in(key, i)))
    return correct / n


def evaluate_model(apply_fn, variables, splits: dict, *, num_classes: int, retained: list[int],
                   norm_order: list[str], ecfg: dict, key) -> dict:
    """Every metric of the study for one model (see the module docstring).

    Every split is evaluated in batches of one size (the smallest split's, at most
    ``ecfg["batch_size"]``), so each evaluation function compiles once per model.
    """
    bs = min([ecfg["batch_size"]] + [data.split_size(s) for s in splits.values()])
    ev = evaluation.evaluator(apply_fn, {"acc": evaluation.accuracy()}, batch_size=bs)
    acc = lambda s: ev(variables, splits[s])["acc"]["accuracy"]
    row = {"forget_acc": acc("forget"), "retain_acc": acc("retain"), "test_acc": acc("test_retain")}
    if "test_forget" in splits:
        row["test_forget_acc"] = acc("test_forget")
    m = metrics.mia_from_model(apply_fn, variables, splits["retain"], splits["val_retain"],
                               splits["forget"], heldout=splits["test_retain"], batch_size=bs)
    row["mia"] = m["forget_nonmember_rate"]
    row["mia_auc"] = m["auc"]
    gaps = metrics.fairness_gap(apply_fn, variables, splits["retain"], num_classes=num_classes,
                                batch_size=bs, per_channel=ecfg["per_channel"],
                                classes=retained)
    missing = [n for n in norm_order if n not in gaps]
    if missing:
        raise ValueError(f"fairness-gap misses normalisation layers {missing}")
    row.update(gap_summary(gaps, norm_order))
    for attack in ("fgsm", "pgd"):
        row[f"{attack}_acc"] = adversarial_accuracy(
            apply_fn, variables, splits["test_retain"], attack=attack, eps=ecfg["eps"],
            steps=ecfg["pgd_steps"], batch_size=bs,
            key=jax.random.fold_in(key, int(attack == "pgd")))
    row["gaps"] = {n: gaps[n] for n in norm_order}
    return row


def compiled_memory(fn, *args) -> dict:
    """XLA's memory analysis of ``jit(fn)(*args)`` (CPU, GPU, TPU): temporaries and total bytes."""
    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    if ma is None:
        return {}
    return {"step_temp_bytes": int(ma.temp_size_in_bytes),
            "step_total_bytes": int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                    + ma.output_size_in_bytes - ma.alias_size_in_bytes)}


def _batch(split: dict, b: int, weight: float = 1.0) -> dict:
    idx = np.arange(b) % data.split_size(split)
    return data.gather_batch({k: jnp.asarray(split[k]) for k in ("x", "y", "index")},
                             jnp.asarray(idx), jnp.full(b, weight, jnp.float32))


def update_memory(method: base.Method, variables, state, splits: dict, *, batch_size: int,
                  forget_batch: int, key) -> dict:
    """:func:`compiled_memory` of one ``update`` of a method on batches of the run's sizes."""
    batches = {}
    if "retain" in method.uses:
        batches["retain"] = _batch(splits["retain"], batch_size)
    if "forget" in method.uses:
        batches["forget"] = _batch(splits["forget"], forget_batch, -1.0)
    return compiled_memory(method.update, variables, state, batches, key)


# ----------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Context:
    """What every method run of one model shares (:func:`run_model` builds it)."""

    model: models.Model
    model_name: str
    original: dict          # the original model's variables
    splits: dict            # class_splits(...): forget, retain, val_retain, test_retain, ...
    num_classes: int
    retained: list          # the retained classes
    norm_order: list        # normalisation layers in call order
    eval: dict              # the preset's "eval" block
    unlearn: dict           # the preset's "unlearn" block
    train_cfg: dict         # the model's original-training recipe
    model_cfg: dict
    key: jax.Array
    out: str
    progress: bool
    memory_analysis: tuple  # methods whose compiled update memory is measured

    @property
    def apply(self):
        return self.model.apply


def method_hparams(ucfg: dict, mcfg: dict, method: str) -> dict:
    """A method's hyperparameters: the preset's, updated by the model's ``unlearn_overrides``."""
    if method not in ucfg["methods"]:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {**ucfg["methods"][method], **mcfg.get("unlearn_overrides", {}).get(method, {})}


def build_method(name: str, ctx: "Context", trainable, k: int | None) -> tuple[base.Method, dict, float]:
    """``(method, run_kwargs, setup_seconds)`` for one method (not Retrain) and trainable mask."""
    apply_fn, ucfg = ctx.apply, ctx.unlearn
    base_name = name[:-len(PENALTY_SUFFIX)] if name.endswith(PENALTY_SUFFIX) else name
    hp = method_hparams(ucfg, ctx.model_cfg, base_name)
    tx = make_optimizer(hp)
    t0 = time.perf_counter()
    if base_name == "CF":
        m = methods.finetune(apply_fn, optimizer=tx, trainable=trainable, name="CF")
    elif base_name == "RL":
        m = methods.random_labels(apply_fn, optimizer=tx, trainable=trainable)
    elif base_name == "SalUn":
        mask = methods.saliency_mask(apply_fn, ctx.original, ctx.splits["forget"],
                                     threshold=hp["threshold"], trainable=trainable)
        trainable = base.combine_masks(mask, trainable)
        m = methods.salun(apply_fn, mask, optimizer=tx)
    elif base_name == "BS":
        m = methods.boundary_shrink(apply_fn, eps=hp["eps"], input_range=INPUT_RANGE, optimizer=tx,
                                    trainable=trainable)
    elif base_name == "SCRUB":
        m = methods.scrub(apply_fn, alpha=hp["alpha"], gamma=hp["gamma"],
                          temperature=hp["temperature"], max_epochs=hp["max_epochs"],
                          optimizer=tx, trainable=trainable)
    elif base_name == "GA":
        m = methods.gradient_ascent(apply_fn, optimizer=tx, trainable=trainable)
    elif base_name == "L1-sparse":
        m = methods.l1_sparse(apply_fn, epochs=int(hp.get("epochs", ucfg["epochs"])), alpha=hp["alpha"],
                              optimizer=tx, trainable=trainable)
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    if name.endswith(PENALTY_SUFFIX):
        pcfg = ucfg["penalty"]
        m = with_fairness_gap_penalty(m, apply_fn, strength=pcfg["strength"],
                                      num_classes=ctx.num_classes,
                                      optimizer=optax.sgd(pcfg["lr"]), trainable=trainable,
                                      classes=ctx.retained,
                                      per_channel=ctx.eval["per_channel"],
                                      target=pcfg["target"])
    setup = time.perf_counter() - t0
    nf, nr = (data.split_size(ctx.splits[s]) for s in ("forget", "retain"))
    bsz = ucfg["batch_size"]
    fb = forget_batch_size(hp.get("forget_batch", bsz), bsz, nf, nr)
    run_kw = {"epochs": int(hp.get("epochs", ucfg["epochs"])), "batch_size": bsz,
              "batch_sizes": {"forget": fb}}
    return m, {"trainable": trainable, **run_kw}, setup


def _steady_epoch_seconds(history: list[dict]) -> float:
    """The fastest epoch after the first (which compiles): on a shared machine the minimum is the
    least load-dependent estimate of the cost. NaN if nothing ran (resumed from a checkpoint)."""
    secs = [h["seconds"] for h in history]
    if not secs:
        return float("nan")
    return float(min(secs[1:] if len(secs) > 1 else secs))


def run_variant(name: str, k: int | None, ctx: "Context") -> dict:
    """Run one method (full model, or the last k blocks) from the original model and evaluate."""
    params = ctx.original["params"]
    trainable = None if k is None else models.last_k_mask(params, k)
    # X+FGP shares X's key (random labels, batch order): the pair differs only by the penalty.
    paired = name[:-len(PENALTY_SUFFIX)] if name.endswith(PENALTY_SUFFIX) else name
    key = jax.random.fold_in(ctx.key, zlib.crc32(variant_name(paired, k).encode()))
    row = {"model": ctx.model_name, "method": name, "scope": "full" if k is None else f"last{k}"}
    if name == "Retrain":
        tcfg = ctx.train_cfg
        if k is None:
            variables, seconds, history, tx = train_model(
                ctx.model, tcfg, ctx.splits["retain"], key=key,
                ckpt_dir=os.path.join(ctx.out, "checkpoints", ctx.model_name, "retrain"),
                progress=ctx.progress, desc=f"{ctx.model_name} retrain")
            row.update(time_s=seconds, setup_s=0.0, epoch_s=_steady_epoch_seconds(history),
                       epochs=tcfg["epochs"], timed_epochs=len(history),
                       trainable_params=count_trainable(params),
                       opt_state_bytes=tree_bytes(jax.eval_shape(tx.init, params)))
            if name in ctx.memory_analysis:
                trainer = methods.retrain(ctx.apply, tx, l2=tcfg["l2"])
                row.update(compiled_memory(trainer.update, ctx.original,
                                           trainer.init(ctx.original),
                                           {"retain": _batch(ctx.splits["retain"],
                                                             tcfg["batch_size"])}, key))
            return _finish(row, variables, ctx)
        # EU-k: re-initialise the last k blocks and retrain only them with the original recipe.
        steps = tcfg["epochs"] * data.num_batches(data.split_size(ctx.splits["retain"]),
                                                  tcfg["batch_size"])
        tx = make_optimizer({**tcfg, "weight_decay": tcfg["l2"]}, steps)
        fresh = init_variables(ctx.model, jax.random.fold_in(key, 99),
                               ctx.splits["retain"]["x"][:1])
        method = methods.eu_k(ctx.apply, fresh, trainable, optimizer=tx)
        run_kw = {"epochs": tcfg["epochs"], "batch_size": tcfg["batch_size"],
                  "batch_sizes": None, "trainable": trainable}
        setup = 0.0
    else:
        method, run_kw, setup = build_method(name, ctx, trainable, k)
    trainable = run_kw.pop("trainable")
    t0 = time.perf_counter()
    forget = ctx.splits["forget"]
    sets = {"forget": {**forget, "weight": -np.ones(data.split_size(forget), np.float32)},
            "retain": ctx.splits["retain"]}
    variables, state, history = loop.run(method, ctx.original, sets, key=key,
                                         progress=ctx.progress, **run_kw)
    seconds = time.perf_counter() - t0
    row.update(time_s=seconds + setup, setup_s=setup, epoch_s=_steady_epoch_seconds(history),
               epochs=run_kw["epochs"], trainable_params=count_trainable(params, trainable),
               opt_state_bytes=optimizer_state_bytes(state))
    if name in ctx.memory_analysis:
        row.update(update_memory(method, ctx.original, method.init(ctx.original),
                                 ctx.splits, batch_size=run_kw["batch_size"],
                                 forget_batch=(run_kw["batch_sizes"] or {}).get("forget", 1), key=key))
    last = history[-1]
    if "fg_penalty" in last:
        row["fg_penalty_last_epoch"] = last["fg_penalty"]
    return _finish(row, variables, ctx)


def _finish(row: dict, variables, ctx: "Context") -> dict:
    row.update(evaluate_model(ctx.apply, variables, ctx.splits,
                              num_classes=ctx.num_classes, retained=ctx.retained,
                              norm_order=ctx.norm_order,
                              ecfg=ctx.eval, key=jax.random.fold_in(ctx.key, 7)))
    return row


def _cached(path: str, fp: str, compute):
    """Reuse the JSON row at ``path`` if its fingerprint matches, else compute and store it."""
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") == fp:
            return stored["row"]
    row = compute()
    common.write_json(path, {"fingerprint": fp, "row": row})
    return row


# ----------------------------------------------------------------------------- one model

def variants(cfg: dict, method_filter=None) -> list[tuple[str, str]]:
    """``(method, scope)`` pairs of a model's run, scope ``"full"`` or ``"k"`` (the last k blocks):
    every method on the full model, then on the last k blocks, then the +FGP methods (full)."""
    chosen = [m for m in METHODS if method_filter is None or m in method_filter]
    pen = [m + PENALTY_SUFFIX for m in cfg["unlearn"]["penalty"]["methods"]
           if method_filter is None or m in method_filter or m + PENALTY_SUFFIX in method_filter]
    return [(m, "full") for m in chosen] + [(m, "k") for m in chosen] + [(m, "full") for m in pen]


def run_model(model_name: str, cfg: dict, ds: data.Dataset, *, out: str, seed: int,
              progress: bool, method_filter=None) -> dict:
    """Train, unlearn and evaluate one model of the preset; returns its rows and correlations."""
    mcfg = cfg["models"][model_name]
    shape = tuple(ds.train["x"].shape[1:])
    model = build_model(mcfg, shape, ds.num_classes)
    ecfg = cfg["eval"]
    check_attack_eps(ecfg["eps"])
    sample = ds.train["x"][:2]
    abstract = jax.eval_shape(model.init, jax.random.key(0), sample)
    blocks = check_last_k(abstract["params"], mcfg["last_k"])
    norm_order = check_norm_layers(model, abstract, sample)
    splits = class_splits(ds, cfg["forget_class"])
    retained = [c for c in range(ds.num_classes) if c != cfg["forget_class"]]
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(model_name.encode()))

    original, train_s, history, _ = train_model(
        model, mcfg["train"], ds.train, key=key,
        ckpt_dir=os.path.join(out, "checkpoints", model_name, "original"), progress=progress,
        desc=f"{model_name} original")
    ctx = Context(model=model, model_name=model_name, original=original, splits=splits,
                  num_classes=ds.num_classes, retained=retained, norm_order=norm_order, eval=ecfg,
                  unlearn=cfg["unlearn"], train_cfg=mcfg["train"], model_cfg=mcfg, key=key,
                  out=out, progress=progress, memory_analysis=tuple(cfg["memory_analysis"]))
    # A method's own hyperparameters (overrides included) enter its row's key below.
    model_fp = {k: v for k, v in mcfg.items() if k != "unlearn_overrides"}
    base_fp = {"version": ROWS_VERSION, "model": model_fp, "data": cfg["data"],
               "forget_class": cfg["forget_class"], "eval": ecfg, "seed": seed,
               "memory": cfg["memory_analysis"]}
    rows_dir = os.path.join(out, "rows", model_name)

    def original_row():
        row = {"model": model_name, "method": "Original", "scope": "full", "time_s": train_s,
               "epochs": mcfg["train"]["epochs"],
               "timed_epochs": len(history), "epoch_s": _steady_epoch_seconds(history),
               "trainable_params": count_trainable(original["params"])}
        return _finish(row, original, ctx)

    rows = [_cached(os.path.join(rows_dir, "Original.json"), fingerprint(base_fp), original_row)]
    for name, scope in variants(cfg, method_filter):
        k = mcfg["last_k"] if scope == "k" else None
        label = variant_name(name, k)
        base_name = name.replace(PENALTY_SUFFIX, "")
        hp = mcfg["train"] if base_name == "Retrain" else \
            method_hparams(cfg["unlearn"], mcfg, base_name)
        fp = fingerprint({**base_fp, "method": name, "k": k, "hp": hp,
                          "unlearn": {x: cfg["unlearn"][x] for x in ("batch_size", "epochs")},
                          "penalty": cfg["unlearn"]["penalty"] if PENALTY_SUFFIX in name else None})
        fname = label.replace(" ", "_").replace("[", "").replace("]", "") + ".json"
        t0 = time.perf_counter()
        row = _cached(os.path.join(rows_dir, fname), fp,
                      functools.partial(run_variant, name, k, ctx))
        print(f"  {model_name:9s} {label:22s} forget {row['forget_acc']:.3f} retain "
              f"{row['retain_acc']:.3f} test {row['test_acc']:.3f} gap {row['gap_mean']:.4f} "
              f"fgsm {row['fgsm_acc']:.3f} pgd {row['pgd_acc']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)",
              flush=True)
        rows.append(row)
    for r in rows:
        add_relative_robustness(r)
        r["gap_shift"] = gap_shift(r["gaps"], rows[0]["gaps"], norm_order)
    return {"model": model_name, "config": mcfg, "blocks": blocks, "last_k": mcfg["last_k"],
            "norm_layers": norm_order, "forget_class": cfg["forget_class"],
            "sizes": {s: data.split_size(v) for s, v in splits.items()},
            "rows": rows, "correlations": correlations(rows), "savings": savings(rows)}


# ----------------------------------------------------------------------------- analysis

def add_relative_robustness(row: dict) -> dict:
    """``fgsm_rel`` / ``pgd_rel`` = adversarial / clean test accuracy (NaN if clean is 0): the
    share of correctly classified test points that survive the attack, so that a model is not
    "vulnerable" merely because it is inaccurate."""
    for attack in ("fgsm", "pgd"):
        clean = row["test_acc"]
        row[f"{attack}_rel"] = row[f"{attack}_acc"] / clean if clean > 0 else float("nan")
    return row


def correlations(rows: list[dict]) -> dict:
    """Conjecture 2 across the unlearned models (the original excluded): Pearson r of fairness-gap
    summaries against FGSM and PGD accuracy and FGSM accuracy relative to clean accuracy
    (:func:`add_relative_robustness`); over all variants and over the full-model ones only.
    Keys ``"<all|full>:<gap>~<adversarial>"``."""
    unl = [r for r in rows if r["method"] != "Original"]
    full = [r for r in unl if r["scope"] == "full"]
    out = {}
    for r in unl:
        if "fgsm_rel" not in r:
            add_relative_robustness(r)
    for subset, rs in (("all", unl), ("full", full)):
        for gap in ("gap_mean", "gap_last"):
            for adv in ("fgsm_acc", "pgd_acc", "fgsm_rel"):
                out[f"{subset}:{gap}~{adv}"] = pearson([r[gap] for r in rs], [r[adv] for r in rs])
    return out


def savings(rows: list[dict]) -> list[dict]:
    """What the last-k restriction saves, per method: ratios full / last-k."""
    by = {(r["method"], r["scope"]): r for r in rows}
    out = []
    for r in rows:
        if r["scope"] == "full" or (r["method"], "full") not in by:
            continue
        f = by[(r["method"], "full")]
        s = {"method": r["method"], "scope": r["scope"]}
        for key in ("time_s", "epoch_s", "trainable_params", "opt_state_bytes", "step_temp_bytes",
                    "step_total_bytes"):
            if key in r and key in f and r[key]:
                s[f"{key}_full"] = f[key]
                s[f"{key}_lastk"] = r[key]
                s[f"{key}_ratio"] = f[key] / r[key]
        for key in ("forget_acc", "test_acc", "gap_mean", "fgsm_acc"):
            s[f"d_{key}"] = r[key] - f[key]
        out.append(s)
    return out


# ----------------------------------------------------------------------------- plots and report

def plot_layers(result: dict, path: str) -> None:
    """Per-layer fairness-gap, one panel per method (full and last-k); Original, Retrain dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, layers = result["rows"], result["norm_layers"]
    ref = {r["method"]: r for r in rows if r["scope"] == "full"}
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "Original"))
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False,
                             sharey=True, layout="constrained")
    xs = np.arange(len(layers))
    for ax, name in zip(axes.ravel(), names):
        for tag, r in (("Original", ref.get("Original")), ("Retrain", ref.get("Retrain"))):
            if r is not None and name != tag:
                ax.plot(xs, [r["gaps"][l] for l in layers], "--", color="grey" if tag == "Original"
                        else "black", lw=1, label=tag)
        for r in rows:
            if r["method"] == name:
                ax.plot(xs, [r["gaps"][l] for l in layers], marker="o", ms=3,
                        label=f"{name} ({r['scope']})")
        ax.set_title(name)
        ax.set_xlabel("normalisation layer (input -> output)")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("fairness-gap (max_c - min_c variance)")
    fig.suptitle(f"{result['model']}: per-layer fairness-gap on D_r (forget class "
                 f"{result['forget_class']})")
    common.savefig(fig, path)


def plot_scatter(result: dict, path: str) -> None:
    """Mean fairness-gap vs FGSM and PGD accuracy across the unlearned models (Conjecture 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "Original"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, adv in zip(axes, ("fgsm_acc", "pgd_acc")):
        x = [r["gap_mean"] for r in rows]
        y = [r[adv] for r in rows]
        for r, xi, yi in zip(rows, x, y):
            ax.scatter(xi, yi, marker="o" if r["scope"] == "full" else "^",
                       color="C3" if PENALTY_SUFFIX in r["method"] else "C0")
            ax.annotate(variant_name(r["method"], None if r["scope"] == "full" else
                                     r["scope"][4:]).replace("[last ", "[k"), (xi, yi), fontsize=6)
        c = result["correlations"][f"all:gap_mean~{adv}"]
        if c["n"] >= 3 and np.ptp(x) > 0:
            a, b = np.polyfit(x, y, 1)
            xx = np.linspace(min(x), max(x), 10)
            ax.plot(xx, a * xx + b, "k--", lw=1)
        ax.set_title(f"{adv.split('_')[0].upper()}: Pearson r = {c['r']:.3f} (p = {c['p']:.3g}, "
                     f"n = {c['n']})")
        ax.set_xlabel("mean per-layer fairness-gap on D_r")
        ax.set_ylabel(f"{adv.split('_')[0].upper()} accuracy (test, retained classes)")
    fig.suptitle(f"{result['model']}: Conjecture 2 (o full model, ^ last-k, red +FGP)")
    common.savefig(fig, path)


def verdict(primary: dict, relative: dict) -> str:
    """One sentence on Conjecture 2 from the primary correlation (mean gap vs FGSM accuracy)."""
    def judge(c):
        if not np.isfinite(c["r"]):
            return "undefined (fewer than 3 models or a constant column)"
        if c["r"] < 0 and c["p"] < 0.05:
            return "supports it (r < 0, p < 0.05)"
        if c["r"] < 0:
            return "points the conjectured way but is not significant (p >= 0.05)"
        return "contradicts it (r >= 0)" + (" significantly" if c["p"] < 0.05 else "")

    return (f"Primary test (all unlearned models, mean per-layer gap vs FGSM accuracy): "
            f"r = {primary['r']:.3f}, p = {primary['p']:.3g}, n = {primary['n']}, which "
            f"{judge(primary)}. Against FGSM accuracy relative to clean accuracy: r = "
            f"{relative['r']:.3f}, p = {relative['p']:.3g}, which {judge(relative)}.")


SUMMARY_COLS = ["method", "scope", "forget_acc", "retain_acc", "test_acc", "mia", "gap_mean",
                "gap_last", "gap_max", "gap_shift", "fgsm_acc", "pgd_acc", "time_s", "epoch_s"]
COST_COLS = ["method", "scope", "trainable_params", "opt_state_bytes", "step_temp_bytes",
             "step_total_bytes", "time_s", "epoch_s"]


def flat_rows(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(summary rows, per-layer rows)`` for the CSV files."""
    summary, layers = [], []
    for res in results:
        for r in res["rows"]:
            summary.append({k: v for k, v in r.items() if k != "gaps"})
            for depth, name in enumerate(res["norm_layers"]):
                layers.append({"model": r["model"], "method": r["method"], "scope": r["scope"],
                               "depth": depth, "layer": name, "fairness_gap": r["gaps"][name]})
    return summary, layers


def report(results: list[dict], cfg: dict, args) -> str:
    ecfg = cfg["eval"]
    title = "Fairness-gap and adversarial robustness of class-wise unlearning"
    lines = [f"# {title} ({args.preset})\n",
             f"Data: {cfg['data']['name']}; forget class {cfg['forget_class']}. Accuracies are "
             "fractions: forget = D_f (train), retain = D_r, test = test samples of the retained "
             "classes. MIA = fraction of D_f a loss-threshold attack (fitted on D_r vs. held-out "
             "retained-class samples) calls non-member. Fairness-gap per normalisation layer l: "
             "max_c - min_c of the class-c feature variance on D_r over the retained classes "
             f"(per_channel={ecfg['per_channel']}); gap_mean = mean over layers, gap_last = the "
             "last "
             "normalisation layer in call order, gap_max = the largest, gap_shift = mean over "
             "layers of |gap_l - gap_l(Original)| (Conjecture 1 asks for 0). FGSM / PGD: white-box "
             f"L-inf attacks, eps = {ecfg['eps_note']}; PGD {ecfg['pgd_steps']} steps of "
             f"2.5 eps / {ecfg['pgd_steps']} with a random start; on the test samples of the "
             "retained classes. time_s = wall time of the method incl. compilation (and the "
             "saliency mask), epoch_s = the fastest epoch after the first (compilation). Pixels "
             "are in [0, 1].\n"]
    for res in results:
        m = res["model"]
        lines.append(f"## {m}\n")
        lines.append(f"Blocks: {', '.join(res['blocks'])}; last-k = the last {res['last_k']} "
                     f"({', '.join(res['blocks'][-res['last_k']:])}). {len(res['norm_layers'])} "
                     f"normalisation layers. Sizes: {res['sizes']}.\n")
        lines.append(common.markdown_table([{k: r.get(k, "") for k in SUMMARY_COLS}
                                            for r in res["rows"]], SUMMARY_COLS, digits=4))
        c = res["correlations"]
        lines.append("\n**Conjecture 2** (higher fairness-gap <-> lower adversarial accuracy; "
                     "supported by r < 0), Pearson across the unlearned models:\n")
        lines.append(verdict(c["all:gap_mean~fgsm_acc"], c["all:gap_mean~fgsm_rel"]) + "\n")
        crow = [{"models": key.split(":")[0], "gap": key.split(":")[1].split("~")[0],
                 "adversarial": key.split("~")[1], **v} for key, v in c.items()]
        lines.append(common.markdown_table(crow, ["models", "gap", "adversarial", "r", "p", "n"],
                                           digits=3))
        lines.append(f"\n![per-layer fairness-gap](fairness_gap_layers_{m}.png)\n"
                     f"![conjecture 2](conjecture2_{m}.png)\n")
        lines.append("\n**Cost** (trainable parameters, optimizer-state bytes, XLA memory of one "
                     "compiled update: temporaries and total):\n")
        lines.append(common.markdown_table([{k: r.get(k, "") for k in COST_COLS}
                                            for r in res["rows"]], COST_COLS, digits=2))
        sv = res["savings"]
        if sv:
            cols = ["method", "scope"] + [c for c in ("trainable_params_ratio",
                                                      "opt_state_bytes_ratio",
                                                      "step_temp_bytes_ratio", "time_s_ratio",
                                                      "epoch_s_ratio", "d_forget_acc",
                                                      "d_test_acc", "d_gap_mean", "d_fgsm_acc")
                                          if any(c in s for s in sv)]
            lines.append("\n**Last-k savings** (ratio = full / last-k; d_* = last-k minus full):\n")
            lines.append(common.markdown_table(sv, cols, digits=3))
        lines.append("")
    return "\n".join(lines)


def _extra_flags(p):
    p.add_argument("--data-dir", default=None, help="TFDS data_dir with cifar10 (array_record)")
    p.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (and their +FGP)")
    p.add_argument("--penalty-strength", type=float, default=None,
                   help="lambda of the fairness-gap penalty (+FGP rows; default: the preset's)")


def main(argv=None) -> dict:
    args = common.parse_preset_args(__doc__.splitlines()[0], presets=tuple(PRESETS),
                                    default_out="runs/fairness_gap", extra=_extra_flags, argv=argv)
    if args.fresh:
        for sub in ("rows", "checkpoints"):
            shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    cfg = resolve_config(args.preset, args.data_dir)
    if args.models:
        want = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in want if m not in cfg["models"]]
        if unknown:
            raise ValueError(f"unknown models {unknown}; the preset has {sorted(cfg['models'])}")
        cfg["models"] = {m: cfg["models"][m] for m in want}
    method_filter = None
    if args.methods:
        method_filter = {m.strip() for m in args.methods.split(",") if m.strip()}
        known = set(METHODS) | {m + PENALTY_SUFFIX for m in METHODS}
        if method_filter - known:
            raise ValueError(f"unknown methods {sorted(method_filter - known)}; "
                             f"choose from {METHODS}")
    if args.penalty_strength is not None:
        cfg["unlearn"]["penalty"]["strength"] = float(args.penalty_strength)
    check_attack_eps(cfg["eval"]["eps"])
    progress = not args.no_progress
    ds = load_dataset(cfg, args.data_dir, args.seed, progress)
    t0 = time.perf_counter()
    results = []
    for name in cfg["models"]:
        print(f"[{name}]", flush=True)
        res = run_model(name, cfg, ds, out=args.out, seed=args.seed, progress=progress,
                        method_filter=method_filter)
        results.append(res)
        plot_layers(res, os.path.join(args.out, f"fairness_gap_layers_{name}.png"))
        plot_scatter(res, os.path.join(args.out, f"conjecture2_{name}.png"))
    summary, layers = flat_rows(results)
    out = {"preset": args.preset, "seed": args.seed, "config": cfg,
           "environment": common.environment(), "seconds": time.perf_counter() - t0,
           "models": results}
    common.write_json(os.path.join(args.out, "results.json"), out)
    common.write_csv(os.path.join(args.out, "summary.csv"), summary)
    common.write_csv(os.path.join(args.out, "fairness_gap_layers.csv"), layers)
    text = report(results, cfg, args)
    common.write_text(os.path.join(args.out, "report.md"), text)
    print(text)
    return out


if __name__ == "__main__":
    main()
