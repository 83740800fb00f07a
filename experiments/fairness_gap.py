"""Fairness-gap and adversarial robustness of class-wise unlearning (Tran & Woo, seeds 000/001).

    python -m experiments.fairness_gap --config experiments/configs/fairness_gap_quick.py \\
        [--set methods=GA,RL --set models=vit ...] [--out DIR] [--data-dir DIR] [--fresh]

``--preset quick|quick-cifar10|smoke|cifar10-resnet50|cifar10-vit`` is the short form of
``--config``. Pipeline, per model of the config:

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

With ``--set seeds=N`` one run repeats this for seeds ``--seed`` .. ``--seed + N - 1`` (same data,
new initialisations and batch orders) and checks the paper's claims over seeds (:func:`analyse`):
per method mean ± 95 % CI and the paired difference against Retrain; Conjecture 1 as the gap
shift from the original against the between-run difference of independently trained originals
(:func:`between_run_difference`); Conjecture 2 pooled over seeds (Fisher z). The verdicts are the
``paper_comparison`` list of ``results.json`` and the first table of ``report.md``. A row depends
only on its (seed, model, method, scope), so a run with more seeds, models, methods or scopes
resumes a smaller one (the selection is not part of the run signature).

Outputs in ``DIR``: ``results.json`` (``paper_comparison``, ``analysis`` and one row per seed, model
and method, rewritten after each; a rerun with the same config skips the finished rows,
``--fresh`` starts over), ``report.md``,
``summary.csv``, ``fairness_gap_layers.csv`` (one row per model, method and layer),
``fairness_gap_layers_<model>.png`` (per-layer gap, one panel per method) and
``conjecture2_<model>.png`` (gap vs adversarial accuracy). The original and retrained models are
checkpointed every epoch.

Configs: ``quick`` (default; CPU, offline: scikit-learn digits with a width-8 ResNet-18 and a
3-block SmallViT, 38 trained models, about 12 CPU-minutes on 2 cores), ``quick-cifar10`` (the same
on a 2,000-example CIFAR-10 subset from ``--data-dir``), ``smoke`` (a tiny SmallViT, for tests),
``cifar10-resnet50`` and ``cifar10-vit`` (paper scale, accelerators; TFDS cifar10 in
``--data-dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, stats
from jaxunlearn import attacks, checkpoint, data, evaluation, loop, methods, metrics, models, subsets
from jaxunlearn.methods import base
from jaxunlearn.methods.fairness_gap_penalty import with_fairness_gap_penalty

METHODS = ("Retrain", "CF", "RL", "BS", "SalUn", "SCRUB", "GA", "L1-sparse")
PENALTY_SUFFIX = "+FGP"
INPUT_RANGE = (0.0, 1.0)  # every image loader returns pixels in [0, 1]
# The fairness-gap statistic of every preset: per channel, pooling the spatial positions (tokens) of
# each sample, i.e. the statistics the normalisation layer itself normalises with (Definition 1 at
# a normalisation layer; metrics/fairness_gap.py). The per-unit variant is not reported.
PER_CHANNEL = True
# Not in the run signature: which rows run, and the memory measurement (extra fields, same numbers).
SELECTION = ("seeds", "seed_offset", "models", "methods", "penalty_methods", "scopes",
             "memory_analysis")


@dataclasses.dataclass(frozen=True)
class Config:
    """One study (configs/fairness_gap_*.py).

    ``recipes``: model name -> ``dict(arch, model kwargs, last_k, train=dict(optimizer, lr,
    epochs, batch_size, l2[, momentum]), unlearn_overrides={method: hparams})``; ``models``: the
    names to run (default: all). ``hparams``: method -> ``dict(optimizer, lr, momentum,
    weight_decay, forget_batch (int or "proportional" = B |D_f| / |D_r|), epochs, the method's
    own keys)``; ``methods``: the ones to run (default: all, with their +FGP). ``eps``: the
    L-inf attack radius (``eps_note`` says it in words); ``memory_analysis``: the methods whose
    compiled update memory is measured (one extra compilation each, first seed only); ``seeds``:
    how many seeds (``--seed``, ``--seed`` + 1, ...) one run loops over, each resumable per
    (seed, model, method, scope).
    """

    dataset: str = "digits"            # digits (embedded) or cifar10 (TFDS, --data-dir)
    max_train: int | None = None       # digits: subsample the training split
    max_examples: int | None = None    # cifar10: cap the TFDS examples
    input: str = "memory"              # cifar10: "stream" reads TFDS batch by batch (common.check_input)
    forget_class: int = 3
    recipes: dict = dataclasses.field(default_factory=dict)
    models: tuple | None = None
    hparams: dict = dataclasses.field(default_factory=dict)
    methods: tuple | None = None
    unlearn_epochs: int = 5
    unlearn_batch_size: int = 64
    penalty_methods: tuple = ("RL", "SalUn")
    penalty_strength: float = 20.0
    penalty_lr: float = 0.01
    penalty_target: str = "variances"
    eps: float = 8 / 255
    eps_note: str = "8/255 on [0, 1] pixels"
    pgd_steps: int = 10
    eval_batch_size: int = 512
    memory_analysis: tuple = ()
    seeds: int = 1                     # seeds base, base + 1, ...; claims need >= 2 (5 documented)
    scopes: tuple = ("full", "k")      # the full model and / or its last k blocks
    seed_offset: int = 0               # run seeds --seed + offset + i (shards seeds over processes)


# ----------------------------------------------------------------------------- checks (pure)

def validate(cfg: Config) -> None:
    """Refuse a config before any compute (:func:`experiments.common.check_config`)."""
    from jaxunlearn.methods.fairness_gap_penalty import TARGETS

    for f in ("seeds", "unlearn_epochs", "unlearn_batch_size", "pgd_steps", "eval_batch_size"):
        common.check_number(f, getattr(cfg, f), low=1, integer=True)
    for f in ("max_train", "max_examples"):
        common.check_number(f, getattr(cfg, f), low=1, integer=True, none_ok=True)
    common.check_number("forget_class", cfg.forget_class, low=0, integer=True)
    common.check_number("penalty_strength", cfg.penalty_strength, low=0)
    common.check_number("penalty_lr", cfg.penalty_lr, low=0, low_open=True)
    check_attack_eps(cfg.eps)
    if cfg.penalty_target not in TARGETS:
        raise ValueError(f"config penalty_target={cfg.penalty_target!r}: choose from {TARGETS}")
    for field, allowed in (("models", tuple(cfg.recipes)), ("penalty_methods", METHODS),
                           ("methods", METHODS + tuple(m + PENALTY_SUFFIX for m in METHODS))):
        bad = [v for v in (getattr(cfg, field) or ()) if v not in allowed]
        if bad:
            raise ValueError(f"config {field}: unknown {bad}; choose from {allowed} with --set {field}=...")
    if not cfg.recipes:
        raise ValueError("config recipes is empty: the config names no model")


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


# ----------------------------------------------------------------------------- data and models

def load_dataset(cfg: Config, data_dir: str | None, seed: int, progress: bool) -> data.Dataset:
    if cfg.dataset == "digits":
        if data_dir:
            raise ValueError("--data-dir is not read by a digits config; for the quick study on "
                             "CIFAR-10 pass --preset quick-cifar10 --data-dir DIR")
        ds = data.load_digits(seed=seed)
        if cfg.max_train:
            perm = data.host_rng((seed, 7)).permutation(len(ds.train["y"]))
            ds = dataclasses.replace(ds, train=data.take(ds.train, np.sort(perm[:cfg.max_train])))
        return ds
    if cfg.dataset == "cifar10":
        if not data_dir:
            raise ValueError("this config reads CIFAR-10 from TFDS: pass --data-dir DIR with "
                             "cifar10 prepared in the array_record format")
        return common.load_dataset("cifar10", data_dir=data_dir, max_train=cfg.max_examples,
                                   seed=seed, progress=progress, input=cfg.input)
    raise ValueError(f"dataset: unknown {cfg.dataset!r}; choose digits or cifar10")


def build_model(recipe: dict, input_shape, num_classes: int) -> models.Model:
    """The model of a recipe (``arch``: resnet18, resnet50 or vit; :func:`common.build_model`)."""
    kw = {k: v for k, v in recipe.items() if k not in ("arch", "last_k", "train", "unlearn_overrides")}
    return common.build_model(recipe["arch"], input_shape, num_classes, **kw)


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


def train_model(model: models.Model, tcfg: dict, split: dict, *, key, ckpt_dir: str,
                progress: bool, desc: str):
    """Train from scratch with a recipe (cosine-decayed optimizer, L2 in the objective),
    resuming from ``ckpt_dir``. Used for the original model and for Retrain (on D_r).

    Returns:
      ``(variables, seconds, history, tx)``: ``history`` has one row per epoch, including the
      epochs of earlier (interrupted) runs, and ``seconds`` is the sum of their epoch times (the
      first includes compilation).
    """
    steps = tcfg["epochs"] * data.num_batches(data.split_size(split), tcfg["batch_size"])
    tx = common.make_optimizer(tcfg["optimizer"], tcfg["lr"], steps=steps,
                               momentum=tcfg.get("momentum"))
    ck = checkpoint.Checkpointer(ckpt_dir)
    try:
        variables, history = common.train_model(
            model, split, tx, epochs=tcfg["epochs"], batch_size=tcfg["batch_size"], l2=tcfg["l2"],
            init_key=None, variables=init_variables(model, jax.random.fold_in(key, 0), split["x"][:1]),
            key=jax.random.fold_in(key, 1), checkpoints=ck, progress=progress, desc=desc)
    finally:
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
    x, y = split["x"], np.asarray(split["y"])  # x: an array or a streamed split's SourceArray
    correct = 0.0
    for i in range(index.shape[0]):
        correct += float(_adv_correct(apply_fn, attack, float(eps), int(steps), INPUT_RANGE,
                                      variables, x[index[i]], y[index[i]], bw[i],
                                      jax.random.fold_in(key, i)))
    return correct / n


def evaluate_model(apply_fn, variables, splits: dict, *, num_classes: int, retained: list[int],
                   norm_order: list[str], cfg: Config, key) -> dict:
    """Every metric of the study for one model (see the module docstring).

    Every split is evaluated in batches of one size (the smallest split's, at most
    ``cfg.eval_batch_size``), so each evaluation function compiles once per model.
    """
    bs = min([cfg.eval_batch_size] + [data.split_size(s) for s in splits.values()])
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
                                batch_size=bs, per_channel=PER_CHANNEL,
                                classes=retained)
    missing = [n for n in norm_order if n not in gaps]
    if missing:
        raise ValueError(f"fairness-gap misses normalisation layers {missing}")
    row.update(gap_summary(gaps, norm_order))
    for attack in ("fgsm", "pgd"):
        row[f"{attack}_acc"] = adversarial_accuracy(
            apply_fn, variables, splits["test_retain"], attack=attack, eps=cfg.eps,
            steps=cfg.pgd_steps, batch_size=bs,
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
    idx = np.arange(b) % data.split_size(split)  # reads only these rows of a streamed x
    return data.gather_batch({k: jnp.asarray(split[k][idx]) for k in ("x", "y", "index")},
                             jnp.arange(b), jnp.full(b, weight, jnp.float32))


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

    cfg: Config
    model: models.Model
    model_name: str
    recipe: dict            # cfg.recipes[model_name]
    original: dict          # the original model's variables
    splits: dict            # class_splits(...): forget, retain, val_retain, test_retain, ...
    num_classes: int
    retained: list          # the retained classes
    norm_order: list        # normalisation layers in call order
    key: jax.Array
    out: str                # checkpoint root of this seed
    progress: bool
    memory_analysis: tuple  # methods whose compiled update memory is measured (first seed only)

    @property
    def apply(self):
        return self.model.apply


def method_hparams(cfg: Config, recipe: dict, method: str) -> dict:
    """A method's hyperparameters: the config's, updated by the recipe's ``unlearn_overrides``."""
    if method not in cfg.hparams:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {**cfg.hparams[method], **recipe.get("unlearn_overrides", {}).get(method, {})}


def build_method(name: str, ctx: Context, trainable) -> tuple[base.Method, dict, float]:
    """``(method, run_kwargs, setup_seconds)`` for one method (not Retrain) and trainable mask."""
    apply_fn, cfg = ctx.apply, ctx.cfg
    base_name = name.removesuffix(PENALTY_SUFFIX)
    hp = method_hparams(cfg, ctx.recipe, base_name)
    tx = common.make_optimizer(hp["optimizer"], hp["lr"], momentum=hp.get("momentum"),
                               weight_decay=hp.get("weight_decay", 0.0))
    epochs = int(hp.get("epochs", cfg.unlearn_epochs))
    t0 = time.perf_counter()
    if base_name == "SalUn":  # the saliency mask (of the trainable leaves) is part of its cost
        forget = ctx.splits["forget"]  # hard removal: weight -1 (the loop's forget convention)
        forget = {**forget, "weight": -np.ones(data.split_size(forget), np.float32)}
        mask = methods.saliency_mask(apply_fn, ctx.original, forget,
                                     threshold=hp["threshold"], trainable=trainable)
        trainable = subsets.combine_masks(mask, trainable)
    make = {
        "CF": lambda: methods.finetune(apply_fn, optimizer=tx, trainable=trainable, name="CF"),
        "RL": lambda: methods.random_labels(apply_fn, optimizer=tx, trainable=trainable),
        "SalUn": lambda: methods.salun(apply_fn, mask, optimizer=tx),
        "BS": lambda: methods.boundary_shrink(apply_fn, eps=hp["eps"], input_range=INPUT_RANGE,
                                              optimizer=tx, trainable=trainable),
        "SCRUB": lambda: methods.scrub(apply_fn, alpha=hp["alpha"], gamma=hp["gamma"],
                                       temperature=hp["temperature"], max_epochs=hp["max_epochs"],
                                       optimizer=tx, trainable=trainable),
        "GA": lambda: methods.gradient_ascent(apply_fn, optimizer=tx, trainable=trainable),
        "L1-sparse": lambda: methods.l1_sparse(apply_fn, epochs=epochs, alpha=hp["alpha"],
                                               optimizer=tx, trainable=trainable),
    }
    m = make[base_name]()
    if name.endswith(PENALTY_SUFFIX):
        m = with_fairness_gap_penalty(m, apply_fn, strength=cfg.penalty_strength,
                                      num_classes=ctx.num_classes, optimizer=optax.sgd(cfg.penalty_lr),
                                      trainable=trainable, classes=ctx.retained,
                                      per_channel=PER_CHANNEL, target=cfg.penalty_target)
    setup = time.perf_counter() - t0
    nf, nr = (data.split_size(ctx.splits[s]) for s in ("forget", "retain"))
    bsz = cfg.unlearn_batch_size
    fb = forget_batch_size(hp.get("forget_batch", bsz), bsz, nf, nr)
    return m, {"trainable": trainable, "epochs": epochs, "batch_size": bsz,
               "batch_sizes": {"forget": fb}}, setup


def _steady_epoch_seconds(history: list[dict]) -> float:
    """The fastest epoch after the first (which compiles): on a shared machine the minimum is the
    least load-dependent estimate of the cost. NaN if nothing ran."""
    secs = [h["seconds"] for h in history]
    if not secs:
        return float("nan")
    return float(min(secs[1:] if len(secs) > 1 else secs))


def run_variant(name: str, k: int | None, ctx: Context) -> dict:
    """Run one method (full model, or the last k blocks) from the original model and evaluate."""
    params, tcfg = ctx.original["params"], ctx.recipe["train"]
    trainable = None if k is None else models.last_k_mask(params, k)
    # X+FGP shares X's key (random labels, batch order): the pair differs only by the penalty.
    key = jax.random.fold_in(ctx.key, zlib.crc32(variant_name(name.removesuffix(PENALTY_SUFFIX),
                                                              k).encode()))
    row = {"model": ctx.model_name, "method": name, "scope": "full" if k is None else f"last{k}"}
    measure_memory = name in ctx.memory_analysis
    if name == "Retrain" and k is None:
        variables, seconds, history, tx = train_model(
            ctx.model, tcfg, ctx.splits["retain"], key=key,
            ckpt_dir=os.path.join(ctx.out, ctx.model_name, "retrain"),
            progress=ctx.progress, desc=f"{ctx.model_name} retrain")
        row.update(time_s=seconds, setup_s=0.0, epoch_s=_steady_epoch_seconds(history),
                   epochs=tcfg["epochs"], timed_epochs=len(history),
                   trainable_params=count_trainable(params),
                   opt_state_bytes=tree_bytes(jax.eval_shape(tx.init, params)))
        if measure_memory:
            trainer = methods.retrain(ctx.apply, tx, l2=tcfg["l2"])
            row.update(compiled_memory(trainer.update, ctx.original, trainer.init(ctx.original),
                                       {"retain": _batch(ctx.splits["retain"], tcfg["batch_size"])},
                                       key))
        return _finish(row, variables, ctx)
    if name == "Retrain":  # EU-k: re-initialise the last k blocks, retrain only them (the recipe)
        steps = tcfg["epochs"] * data.num_batches(data.split_size(ctx.splits["retain"]),
                                                  tcfg["batch_size"])
        tx = common.make_optimizer(tcfg["optimizer"], tcfg["lr"], steps=steps,
                                   momentum=tcfg.get("momentum"), weight_decay=tcfg["l2"])
        fresh = init_variables(ctx.model, jax.random.fold_in(key, 99), ctx.splits["retain"]["x"][:1])
        method = methods.eu_k(ctx.apply, fresh, trainable, optimizer=tx)
        run_kw, setup = {"epochs": tcfg["epochs"], "batch_size": tcfg["batch_size"]}, 0.0
    else:
        method, run_kw, setup = build_method(name, ctx, trainable)
        trainable = run_kw.pop("trainable")
    t0 = time.perf_counter()
    forget = ctx.splits["forget"]
    sets = {"forget": {**forget, "weight": -np.ones(data.split_size(forget), np.float32)},
            "retain": ctx.splits["retain"]}
    variables, state, history = loop.run(method, ctx.original, sets, key=key, mesh=common.MESH,
                                         progress=ctx.progress, **run_kw)
    seconds = time.perf_counter() - t0
    row.update(time_s=seconds + setup, setup_s=setup, epoch_s=_steady_epoch_seconds(history),
               epochs=run_kw["epochs"], trainable_params=count_trainable(params, trainable),
               opt_state_bytes=optimizer_state_bytes(state))
    if measure_memory:
        row.update(update_memory(method, ctx.original, method.init(ctx.original), ctx.splits,
                                 batch_size=run_kw["batch_size"],
                                 forget_batch=run_kw.get("batch_sizes", {}).get("forget", 1), key=key))
    if "fg_penalty" in history[-1]:
        row["fg_penalty_last_epoch"] = history[-1]["fg_penalty"]
    return _finish(row, variables, ctx)


def _finish(row: dict, variables, ctx: Context) -> dict:
    row.update(evaluate_model(ctx.apply, variables, ctx.splits, num_classes=ctx.num_classes,
                              retained=ctx.retained, norm_order=ctx.norm_order, cfg=ctx.cfg,
                              key=jax.random.fold_in(ctx.key, 7)))
    return row


# ----------------------------------------------------------------------------- one model

def variants(cfg: Config) -> list[tuple[str, str]]:
    """``(method, scope)`` pairs of a model's run, scope ``"full"`` or ``"k"`` (the last k blocks):
    every chosen method on the full model, then on the last k blocks, then the +FGP methods."""
    want = None if cfg.methods is None else set(cfg.methods)
    bad = sorted(set(cfg.scopes) - {"full", "k"})
    if bad:
        raise ValueError(f"scopes: unknown {bad}; choose from 'full' and 'k' (the last k blocks)")
    chosen = [m for m in METHODS if want is None or m in want]
    pen = [m + PENALTY_SUFFIX for m in cfg.penalty_methods
           if (want is None or m in want or m + PENALTY_SUFFIX in want) and "full" in cfg.scopes]
    return [(m, s) for s in ("full", "k") if s in cfg.scopes for m in chosen] + [
        (m, "full") for m in pen]


def run_model(model_name: str, cfg: Config, ds: data.Dataset, *, out: str, seed: int,
              progress: bool, rows: list | None = None, save=lambda: None,
              memory_analysis: tuple | None = None) -> dict:
    """Train, unlearn and evaluate one model of the config for one seed; returns its rows and
    correlations.

    ``rows`` holds the finished rows of an earlier run (those of this model and seed are kept,
    not recomputed) and gets each new row (tagged with ``"seed"``) appended, after which
    ``save()`` is called. Checkpoints go under ``out/checkpoints/seed<seed>``.
    """
    recipe = cfg.recipes[model_name]
    model = build_model(recipe, tuple(ds.train["x"].shape[1:]), ds.num_classes)
    check_attack_eps(cfg.eps)
    sample = ds.train["x"][:2]
    abstract = jax.eval_shape(model.init, jax.random.key(0), sample)
    blocks = check_last_k(abstract["params"], recipe["last_k"])
    norm_order = check_norm_layers(model, abstract, sample)
    splits = class_splits(ds, cfg.forget_class)
    rows = [] if rows is None else rows
    done = {(r["method"], r["scope"]): r for r in rows
            if r["model"] == model_name and r.get("seed", seed) == seed}
    todo = [("Original", "full")] + [(m, f"last{recipe['last_k']}" if s == "k" else s)
                                     for m, s in variants(cfg)]
    ckpt_root = os.path.join(out, "checkpoints", f"seed{seed}")
    if any(t not in done for t in todo):
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(model_name.encode()))
        original, train_s, history, _ = train_model(
            model, recipe["train"], ds.train, key=key,
            ckpt_dir=os.path.join(ckpt_root, model_name, "original"), progress=progress,
            desc=f"{model_name} original")
        ctx = Context(cfg=cfg, model=model, model_name=model_name, recipe=recipe, original=original,
                      splits=splits, num_classes=ds.num_classes,
                      retained=[c for c in range(ds.num_classes) if c != cfg.forget_class],
                      norm_order=norm_order, key=key, out=ckpt_root, progress=progress,
                      memory_analysis=cfg.memory_analysis if memory_analysis is None
                      else memory_analysis)
    for method, scope in todo:
        if (method, scope) in done:
            continue
        t0 = time.perf_counter()
        name = variant_name(method, None if scope == "full" else recipe["last_k"])
        if method == "Original":
            row = _finish({"model": model_name, "method": "Original", "scope": "full",
                           "time_s": train_s, "epochs": recipe["train"]["epochs"],
                           "timed_epochs": len(history), "epoch_s": _steady_epoch_seconds(history),
                           "trainable_params": count_trainable(original["params"])}, original, ctx)
        else:
            try:
                row = run_variant(method, None if scope == "full" else recipe["last_k"], ctx)
            except FloatingPointError as e:  # a diverging method is a finding, not the end of the study
                row = {"model": model_name, "method": method, "scope": scope, "diverged": f"{name}: {e}"}
        row["seed"] = seed
        label = f"  {model_name:9s} {name:22s}"
        if "diverged" in row:
            print(f"{label} DIVERGED ({row['diverged']}); left out of every table", flush=True)
        else:
            print(f"{label} forget {row['forget_acc']:.3f} retain {row['retain_acc']:.3f} test "
                  f"{row['test_acc']:.3f} gap {row['gap_mean']:.4f} fgsm {row['fgsm_acc']:.3f} pgd "
                  f"{row['pgd_acc']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        done[(method, scope)] = row
        rows.append(row)
        save()
    mine = [done[t] for t in todo if "diverged" not in done[t]]
    for r in mine:
        add_relative_robustness(r)
        r["gap_shift"] = gap_shift(r["gaps"], mine[0]["gaps"], norm_order)
    return {"model": model_name, "blocks": blocks, "last_k": recipe["last_k"],
            "norm_layers": norm_order, "forget_class": cfg.forget_class,
            "sizes": {s: data.split_size(v) for s, v in splits.items()},
            "rows": mine, "correlations": correlations(mine), "savings": savings(mine),
            "diverged": [done[t]["diverged"] for t in todo if "diverged" in done[t]]}


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


# ----------------------------------------------------------------------------- seeds and claims

# Claim thresholds (stated in the report): "preserves robustness" = the 95 % CI of the paired FGSM
# accuracy difference against Retrain lies above -ROBUST_MARGIN (no loss larger than 5 points);
# "sufficient" last-k unlearning = forget / test accuracy within SUFFICIENT_MARGIN of full-model.
ROBUST_MARGIN = 0.05
SUFFICIENT_MARGIN = 0.05
APPROX_LOSERS = ("RL", "SalUn", "SCRUB")   # the paper: up to 50 % adversarial accuracy lost
PRESERVERS = ("CF", "BS")                  # the paper: preserve the gap and robustness


def between_run_difference(profiles: list[dict], order: list[str]) -> float:
    """Conjecture 1's between-run difference: the mean over pairs of runs s < s' of the mean over
    layers of ``|gap_l(s) - gap_l(s')|``, i.e. how far two independent training runs of one
    recipe (different seeds, same data) lie apart in per-layer fairness-gap. NaN with < 2 runs.

    Args:
      profiles: one ``{layer: gap}`` per run.
      order: the layers to average over.
    """
    if len(profiles) < 2:
        return float("nan")
    d = [np.mean([abs(a[n] - b[n]) for n in order])
         for i, a in enumerate(profiles) for b in profiles[i + 1:]]
    return float(np.mean(d))


def within(ci: dict, bound: float) -> bool | str:
    """Whether a quantity with interval ``ci`` is below ``bound``: True if the whole interval is,
    False if the whole interval is above it, otherwise (or with one seed) ``"inconclusive"``."""
    return stats.verdict(ci["lo"] - bound, ci["hi"] - bound, expect="negative")


def above(ci: dict, bound: float) -> bool | str:
    """True if the whole interval lies above ``bound``, False if below, else ``"inconclusive"``."""
    return stats.verdict(ci["lo"] - bound, ci["hi"] - bound, expect="positive")


def _all(verdicts) -> bool | str:
    v = list(verdicts)
    if all(x is True for x in v):
        return True
    if any(x is False for x in v):
        return False
    return "inconclusive"


def seed_table(by_seed: dict, model: str) -> tuple[list[str], dict]:
    """``(variant keys in order, {key: {metric: [one value per seed]}})`` for one model; the key is
    ``(method, scope)``, only variants present in every seed."""
    seeds = sorted(by_seed)
    per = [{(r["method"], r["scope"]): r for res in by_seed[s] if res["model"] == model
            for r in res["rows"]} for s in seeds]
    keys = [k for k in per[0] if all(k in p for p in per)]
    cols = ("forget_acc", "retain_acc", "test_acc", "mia", "mia_auc", "gap_mean", "gap_last",
            "gap_shift", "fgsm_acc", "pgd_acc", "fgsm_rel", "epoch_s", "step_temp_bytes")
    return keys, {k: {c: [p[k][c] for p in per] for c in cols if all(c in p[k] for p in per)}
                  for k in keys}


def analyse(by_seed: dict) -> dict:
    """The seed-level analysis: per model, mean ± 95 % CI of every variant's metrics, paired
    comparisons with Retrain, Conjecture 1 (gap shift against the between-run difference),
    Conjecture 2 pooled over seeds (Fisher z), the last-k claim, and the ``paper_comparison``
    entries (:func:`experiments.stats.claim`)."""
    seeds = sorted(by_seed)
    models_ = [res["model"] for res in by_seed[seeds[0]]]
    out = {"seeds": seeds, "models": {}, "paper_comparison": [],
           "diverged": [f"seed {s}, {res['model']}, {d}" for s in seeds for res in by_seed[s]
                        for d in res.get("diverged", [])]}
    claims = out["paper_comparison"]
    for m in models_:
        res0 = next(r for r in by_seed[seeds[0]] if r["model"] == m)
        order, k = res0["norm_layers"], res0["last_k"]
        keys, vals = seed_table(by_seed, m)
        full = lambda meth: vals.get((meth, "full"))
        ref = full("Retrain")
        table = []
        for key in keys:
            v = vals[key]
            row = {"method": key[0], "scope": key[1],
                   **{c: stats.mean_ci(x) for c, x in v.items()}}
            if ref is not None and key != ("Retrain", "full"):
                row["fgsm_vs_retrain"] = stats.paired(v["fgsm_acc"], ref["fgsm_acc"])
                if min(ref["fgsm_acc"]) > 0:
                    row["fgsm_rel_drop"] = stats.mean_ci(
                        [100 * (1 - a / b) for a, b in zip(v["fgsm_acc"], ref["fgsm_acc"])])
                row["gap_vs_retrain"] = stats.paired(v["gap_mean"], ref["gap_mean"],
                                                     higher_is_better=False)
            table.append(row)
        by_key = {(r["method"], r["scope"]): r for r in table}
        profiles = lambda meth: [next(r for res in by_seed[s] if res["model"] == m
                                      for r in res["rows"] if (r["method"], r["scope"]) == (meth, "full"))["gaps"]
                                 for s in seeds]
        d_orig = between_run_difference(profiles("Original"), order)
        d_retrain = (between_run_difference(profiles("Retrain"), order)
                     if ref is not None else float("nan"))
        # Conjecture 2 per seed, pooled
        per_seed = [next(r for r in by_seed[s] if r["model"] == m)["correlations"] for s in seeds]
        conj2 = {}
        for key in ("all:gap_mean~fgsm_acc", "all:gap_mean~pgd_acc", "all:gap_mean~fgsm_rel"):
            rs = [c[key] for c in per_seed if np.isfinite(c[key]["r"]) and c[key]["n"] > 3]
            conj2[key] = ({"per_seed_r": [c["r"] for c in rs],
                           **stats.pooled_correlation([c["r"] for c in rs], [c["n"] for c in rs])}
                          if rs else {"per_seed_r": [], "r": float("nan"), "lo": float("nan"),
                                      "hi": float("nan"), "p": float("nan"), "n_seeds": 0})
        out["models"][m] = {"table": table, "between_run_original": d_orig,
                            "between_run_retrain": d_retrain, "conjecture2": conj2}
        tag = f" ({m}, {len(seeds)} seed{'s' * (len(seeds) > 1)})"
        # RL, SalUn, SCRUB lose adversarial accuracy against Retrain
        for meth in APPROX_LOSERS:
            r = by_key.get((meth, "full"))
            if r is None or ref is None:
                continue
            d = r["fgsm_vs_retrain"]
            claims.append(stats.claim(
                f"{meth} loses FGSM accuracy against Retrain" + tag,
                "RL, SalUn, SCRUB: up to 50 % lower adversarial accuracy than Retrain",
                f"FGSM acc. {stats.fmt_ci(r['fgsm_acc'])} vs Retrain {stats.fmt_ci(by_key[('Retrain', 'full')]['fgsm_acc'])}; "
                f"difference {stats.fmt_ci(d['diff'])} (p = {d['p']:.3g}, Retrain better in "
                f"{d['n'] - d['wins']}/{d['n']} seeds)"
                + (f"; relative drop {stats.fmt_ci(r['fgsm_rel_drop'])} %"
                   if "fgsm_rel_drop" in r else ""),
                stats.verdict(d["diff"]["lo"], d["diff"]["hi"], expect="negative")))
            g = r["gap_vs_retrain"]
            claims.append(stats.claim(
                f"{meth} has a higher fairness-gap than Retrain" + tag,
                "RL, SalUn, SCRUB increase the fairness-gap against exact unlearning",
                f"mean per-layer gap {stats.fmt_ci(r['gap_mean'])} vs Retrain "
                f"{stats.fmt_ci(by_key[('Retrain', 'full')]['gap_mean'])}; difference "
                f"{stats.fmt_ci(g['diff'])} (p = {g['p']:.3g})",
                stats.verdict(g["diff"]["lo"], g["diff"]["hi"], expect="positive")))
        # CF and BS preserve the gap (Conjecture 1's measure) and robustness
        for meth in PRESERVERS:
            r = by_key.get((meth, "full"))
            if r is None or ref is None:
                continue
            d = r["fgsm_vs_retrain"]
            keep_gap = within(r["gap_shift"], d_orig)
            keep_rob = above(d["diff"], -ROBUST_MARGIN)
            claims.append(stats.claim(
                f"{meth} preserves the fairness-gap and robustness" + tag,
                "CF and BS preserve the fairness-gap and robustness",
                f"gap shift from the original {stats.fmt_ci(r['gap_shift'])} vs between-run "
                f"difference {d_orig:.3g} ({'within' if keep_gap is True else 'not within' if keep_gap is False else 'unclear'}); "
                f"FGSM acc. - Retrain {stats.fmt_ci(d['diff'])} (margin -{ROBUST_MARGIN})",
                _all((keep_gap, keep_rob))))
        # Conjecture 1: exact unlearning preserves the original's gap (within the between-run
        # difference); the approximate methods that move it more are flagged in the table.
        if ref is not None:
            sh = by_key[("Retrain", "full")]["gap_shift"]
            moved = [meth for (meth, sc), r in by_key.items()
                     if sc == "full" and meth not in ("Original", "Retrain")
                     and within(r["gap_shift"], d_orig) is False]
            claims.append(stats.claim(
                "Conjecture 1: exact unlearning keeps the original's fairness-gap" + tag,
                "Retrain preserves the fairness-gap of the original model",
                f"Retrain's gap shift {stats.fmt_ci(sh)} vs between-run difference of the "
                f"original {d_orig:.3g} (of Retrain {d_retrain:.3g}); beyond it: "
                f"{', '.join(moved) or 'none'}",
                within(sh, d_orig)))
        c = conj2["all:gap_mean~fgsm_acc"]
        claims.append(stats.claim(
            "Conjecture 2: higher fairness-gap, lower adversarial accuracy" + tag,
            "negative correlation between fairness-gap and FGSM accuracy",
            f"pooled Pearson r = {c['r']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] (p = {c['p']:.3g}; "
            f"per seed {', '.join(f'{x:.2f}' for x in c['per_seed_r'])})",
            stats.verdict(c["lo"], c["hi"], expect="negative")))
        # unlearning only the last k blocks is sufficient (forgets like the full-model run, keeps
        # test accuracy) and cheaper, for the methods that forget on the full model
        lk = [meth for meth in ("Retrain", "RL", "SalUn") if (meth, f"last{k}") in vals
              and (meth, "full") in vals]
        if lk:
            dforget = stats.mean_ci(np.mean([np.subtract(vals[(x, f"last{k}")]["forget_acc"],
                                                         vals[(x, "full")]["forget_acc"])
                                             for x in lk], axis=0))
            dtest = stats.mean_ci(np.mean([np.subtract(vals[(x, f"last{k}")]["test_acc"],
                                                       vals[(x, "full")]["test_acc"])
                                           for x in lk], axis=0))
            ratios = [np.divide(vals[(x, "full")]["epoch_s"], vals[(x, f"last{k}")]["epoch_s"])
                      for x in lk if "epoch_s" in vals[(x, "full")]]
            speed = stats.mean_ci(np.mean(ratios, axis=0)) if ratios else None
            verdicts = [within(dforget, SUFFICIENT_MARGIN), above(dtest, -SUFFICIENT_MARGIN)]
            if speed is not None:
                verdicts.append(above(speed, 1.0))
            claims.append(stats.claim(
                f"Unlearning the last {k} blocks is sufficient and cheaper" + tag,
                "unlearning in the intermediate and last layers is sufficient and cost-effective",
                f"{', '.join(lk)}: last-k minus full forget acc. {stats.fmt_ci(dforget)}, test acc. "
                f"{stats.fmt_ci(dtest)} (margins ±{SUFFICIENT_MARGIN})"
                + (f"; epoch speed-up {stats.fmt_ci(speed)}x" if speed is not None else ""),
                _all(verdicts)))
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
    """Mean fairness-gap vs FGSM and PGD accuracy across the unlearned models (Conjecture 2).

    No text labels (they overlap): colour = method, marker = scope (o full model, ^ last-k;
    s / D the same with the +FGP penalty), named in one legend beside the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in result["rows"] if r["method"] != "Original"]
    bases = list(dict.fromkeys(r["method"].removesuffix(PENALTY_SUFFIX) for r in rows))
    color = {b: plt.cm.tab10(i % 10) for i, b in enumerate(bases)}
    shapes = {(False, False): "o", (True, False): "^", (False, True): "s", (True, True): "D"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for ax, adv in zip(axes, ("fgsm_acc", "pgd_acc")):
        x = [r["gap_mean"] for r in rows]
        y = [r[adv] for r in rows]
        for r, xi, yi in zip(rows, x, y):
            key = (r["scope"] != "full", r["method"].endswith(PENALTY_SUFFIX))
            ax.scatter(xi, yi, marker=shapes[key], s=40, alpha=0.85, edgecolors="k", linewidths=0.4,
                       color=color[r["method"].removesuffix(PENALTY_SUFFIX)])
        c = result["correlations"][f"all:gap_mean~{adv}"]
        if c["n"] >= 3 and np.ptp(x) > 0:
            a, b = np.polyfit(x, y, 1)
            xx = np.linspace(min(x), max(x), 10)
            ax.plot(xx, a * xx + b, "k--", lw=1)
        ax.set_title(f"{adv.split('_')[0].upper()}: Pearson r = {c['r']:.3f} (p = {c['p']:.3g}, "
                     f"n = {c['n']})")
        ax.set_xlabel("mean per-layer fairness-gap on D_r")
        ax.set_ylabel(f"{adv.split('_')[0].upper()} accuracy (test, retained classes)")
    handles = [Line2D([], [], ls="", marker="o", color=color[b], label=b) for b in bases]
    used = {(r["scope"] != "full", r["method"].endswith(PENALTY_SUFFIX)) for r in rows}
    names = {(False, False): "full model", (True, False): "last-k blocks (Retrain: EU-k)",
             (False, True): f"full {PENALTY_SUFFIX}", (True, True): f"last-k {PENALTY_SUFFIX}"}
    handles += [Line2D([], [], ls="", marker=shapes[k], color="0.5", mec="k", label=names[k])
                for k in shapes if k in used]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle(f"{result['model']}: Conjecture 2 (mean fairness-gap vs adversarial accuracy)")
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


SEED_COLS = ("forget_acc", "test_acc", "mia", "gap_mean", "gap_shift", "fgsm_acc", "pgd_acc")


def seed_report(analysis: dict) -> list[str]:
    """The seed-level tables: mean ± 95 % CI per variant and the paired comparison with Retrain."""
    seeds = analysis["seeds"]
    lines = [f"## Over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): mean ± 95 % CI\n",
             "vs Retrain: paired FGSM-accuracy difference (method - Retrain), its paired t-test p "
             "and the seeds in which the method is more robust; rel. drop = 100 (1 - "
             "FGSM / FGSM(Retrain)) in %. Conjecture 1's between-run difference = mean over "
             "pairs of seeds of mean_l |gap_l(run s) - gap_l(run s')| of the independently "
             "trained originals (and retrained models); a method keeps the original's gap when "
             f"its gap_shift lies within it. 'Preserves robustness' = the difference's CI lies "
             f"above -{ROBUST_MARGIN}.\n"]
    for m, a in analysis["models"].items():
        lines.append(f"### {m}\n")
        rows = []
        for r in a["table"]:
            row = {"method": r["method"], "scope": r["scope"],
                   **{c: stats.fmt_ci(r[c]) for c in SEED_COLS if c in r}}
            if "fgsm_vs_retrain" in r:
                d = r["fgsm_vs_retrain"]
                row["FGSM - Retrain"] = stats.fmt_ci(d["diff"])
                row["p"] = f"{d['p']:.3g}"
                row["seeds above Retrain"] = f"{d['wins']}/{d['n']}"
                if "fgsm_rel_drop" in r:
                    row["rel. drop %"] = stats.fmt_ci(r["fgsm_rel_drop"])
            rows.append(row)
        lines.append(common.markdown_table(rows))
        lines.append(f"\nBetween-run difference of the per-layer fairness-gap: originals "
                     f"{a['between_run_original']:.4g}, retrained models "
                     f"{a['between_run_retrain']:.4g}.\n")
        crow = [{"gap ~ adversarial": k.split(":")[1], "pooled r": v["r"], "lo": v["lo"],
                 "hi": v["hi"], "p": v["p"], "seeds": v["n_seeds"],
                 "per seed": ", ".join(f"{x:.2f}" for x in v["per_seed_r"])}
                for k, v in a["conjecture2"].items()]
        lines.append("Conjecture 2 pooled over seeds (Fisher z, weights n - 3; all unlearned "
                     "variants of a seed):\n")
        lines.append(common.markdown_table(crow, digits=3))
    return lines


def report(results: list[dict], cfg: Config, name: str, analysis: dict) -> str:
    """``report.md``: the paper comparison first, then the seed-level tables, then the first
    seed's per-model tables, correlations and costs."""
    title = "Fairness-gap and adversarial robustness of class-wise unlearning"
    lines = [f"# {title} ({name})\n",
             "## Paper vs ours\n",
             stats.comparison_table(analysis["paper_comparison"]),
             f"Data: {cfg.dataset}; forget class {cfg.forget_class}. Accuracies are "
             "fractions: forget = D_f (train), retain = D_r, test = test samples of the retained "
             "classes. MIA = fraction of D_f a loss-threshold attack (fitted on D_r vs. held-out "
             "retained-class samples) calls non-member. Fairness-gap per normalisation layer l: "
             "max_c - min_c of the class-c feature variance on D_r over the retained classes "
             "(per channel: each channel's variance over the samples and positions / tokens of "
             "class c, averaged over channels); gap_mean = mean over layers, gap_last = the last "
             "normalisation layer in call order, gap_max = the largest, gap_shift = mean over "
             "layers of |gap_l - gap_l(Original)| (Conjecture 1 asks for 0). FGSM / PGD: white-box "
             f"L-inf attacks, eps = {cfg.eps_note}; PGD {cfg.pgd_steps} steps of "
             f"2.5 eps / {cfg.pgd_steps} with a random start; on the test samples of the "
             "retained classes. time_s = wall time of the method incl. compilation (and the "
             "saliency mask), epoch_s = the fastest epoch after the first (compilation). Pixels "
             "are in [0, 1].\n"]
    lines += seed_report(analysis)
    if analysis.get("diverged"):
        lines.append("**Diverged** (loss not finite; these variants are left out of every table, and "
                     "a variant missing in any seed is left out of the seed tables): "
                     + "; ".join(analysis["diverged"]) + "\n")
    lines.append(f"## First seed ({analysis['seeds'][0]}) in detail\n")
    for res in results:
        m = res["model"]
        lines.append(f"### {m}\n")
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


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--data-dir", default=None, help="TFDS data_dir with cifar10 (array_record)")
        p.add_argument("--no-compile-cache", action="store_true",
                       help="do not use JAX's persistent compilation cache in OUT/.jax_cache")

    args, cfg, name = common.parse_args(__doc__.splitlines()[0], driver="fairness_gap",
                                        config_cls=Config, default_out="runs/fairness_gap",
                                        extra=extra, argv=argv, validate=validate)
    if not args.no_compile_cache and jax.config.jax_compilation_cache_dir is None:
        # Every seed compiles the same programs; the persistent cache serves the repeats.
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    ds = load_dataset(cfg, args.data_dir, args.seed, not args.no_progress)
    path = os.path.join(args.out, "results.json")
    if args.fresh:
        shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)
    # A row depends on its (seed, model, method, scope) only, so the selection fields are left out
    # of the signature: a run with more seeds, models, methods or scopes resumes a smaller one.
    signature = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in SELECTION}, "seed": args.seed}
    rows = [] if args.fresh else common.resume_rows(path, signature)
    save = lambda: common.write_json(path, {"signature": signature, "rows": rows})
    t0 = time.perf_counter()
    # The data split always comes from --seed; the model seeds are --seed + seed_offset + i.
    seeds = [args.seed + cfg.seed_offset + i for i in range(cfg.seeds)]
    by_seed = {}  # seed -> [per-model result]
    for i, seed in enumerate(seeds):
        for model_name in cfg.models or tuple(cfg.recipes):
            print(f"[{model_name}, seed {seed}]", flush=True)
            res = run_model(model_name, cfg, ds, out=args.out, seed=seed, progress=not args.no_progress, rows=rows, save=save,
                            memory_analysis=None if i == 0 else ())
            by_seed.setdefault(seed, []).append(res)
    results = by_seed[seeds[0]]  # plots and per-model tables: the first seed
    for res in results:
        plot_layers(res, os.path.join(args.out, f"fairness_gap_layers_{res['model']}.png"))
        plot_scatter(res, os.path.join(args.out, f"conjecture2_{res['model']}.png"))
    analysis = analyse(by_seed)
    summary, layers = flat_rows([r for s in seeds for r in by_seed[s]])
    out = {"signature": signature, "preset": name, "seed": args.seed, "seeds": seeds,
           "paper_comparison": analysis["paper_comparison"],
           "environment": common.environment(), "seconds": time.perf_counter() - t0,
           "analysis": {k: v for k, v in analysis.items() if k != "paper_comparison"},
           "models": [{k: v for k, v in r.items() if k != "rows"} for s in seeds for r in by_seed[s]],
           # every finished row, also those of seeds / methods outside this run's selection
           "rows": rows}
    common.write_json(path, out)
    common.write_csv(os.path.join(args.out, "summary.csv"), summary)
    common.write_csv(os.path.join(args.out, "fairness_gap_layers.csv"), layers)
    text = report(results, cfg, name, analysis)
    common.write_text(os.path.join(args.out, "report.md"), text)
    print(text)
    return out


if __name__ == "__main__":
    main()
