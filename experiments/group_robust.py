"""Group-robust unlearning (De Min et al. 2025): skewed forget sets, reweighting, MIU, group metrics.

    python -m experiments.group_robust --config experiments/configs/group_robust_quick.py \\
        [--set ratios=0.5,0.9 ...] [--out DIR] [--data-dir DIR] [--fresh]

``--preset quick|tiny|celeba|waterbirds|fairface`` is the short form of ``--config``. The forget set
is a fraction r of one (target, sensitive) cell of the training set (``data.forget_group``), so it
is dominated by one group. For every dataset and ratio the driver trains the original model once,
then compares on the same split:

* exact unlearning: retraining on D_r, and De Min's group-reweighted retraining with the weights
  ``w = N_train(g) / N_retain(g)`` (``weights.group_weights``) used as a weighted sampler with
  replacement (the reference) and as loss weights (same weights, mean 1 over D_r);
* approximate unlearning: L1-sparse, SalUn and SCRUB, plain and with the reweighting sampler, and
  MIU (``methods.miu``, with the sampler as in the paper; "MIU (no RW)" is its ablation);
* beyond the paper: soft weights (seed 004) for the retain samples from the last-layer influence of
  each retain sample on the validation loss gap of the forget cell's class between sensitive
  groups (an EO surrogate), solved by ``weights.soft_weights``, multiplied into the reweighting
  sampler, for retraining ("RW+SW retrain") and for MIU ("MIU+SW").

Metrics (``evaluate``): retain / forget / test accuracy, MIA (forget non-member rate and AUC,
loss threshold attack fitted on retain vs validation), De Min's EO, group accuracy (test accuracy
on the forget cell), worst-group accuracy over the test (target, sensitive) cells, Avg. Gap and
ToW against the reweighted retrain (the paper's reference for group-robust unlearning) and against
the plain retrain.

Configs (``experiments/configs/group_robust_*.py``): ``quick`` (default; offline, CPU, about 5.5
CPU-minutes): Adult (target income > 50K, sensitive sex; forget cell = high-income women) and
scikit-learn digits with a spurious frame cue (forget cell = digit 9 without frame, a minority cell),
both with an MLP; ``celeba``, ``waterbirds``, ``fairface`` train ResNet-18 from ``--data-dir`` with
the reference's recipes, from scratch; ``tiny`` is the test config.

``--set seeds=N`` repeats every cell for seeds ``--seed`` .. ``--seed + N - 1`` (forget set,
initialisation and batch order drawn per seed) and checks the paper's claims over seeds
(:func:`analyse`: mean ± 95 % CI per method and metric, MIU against every baseline paired over
seeds); the verdicts are ``paper_comparison`` in ``results.json`` and the first table of
``report.md``.

Writes ``DIR/results.json`` (``paper_comparison``, ``analysis`` and one row per finished (seed,
dataset, ratio) cell, rewritten after each; a rerun skips the finished cells, also one with more
seeds or ratios, ``--fresh`` starts over; the original models are checkpointed under
``DIR/checkpoints/seed<s>``), ``DIR/report.md`` (tables in the paper's form, percent), per-cell CSVs and
``DIR/group_accuracy.png``. JAX's persistent compilation cache is kept in ``DIR/.jax_cache``
(``--no-compile-cache`` to disable).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, stats
from jaxunlearn import checkpoint, data, evaluation, loop, metrics, sharding, weights
from jaxunlearn import methods as M
from jaxunlearn import mutual_information as mi
from jaxunlearn.influence import last_layer, measurements, scores
miu_lib = importlib.import_module("jaxunlearn.methods.miu")  # the module, not the exported factory

RATIOS = (0.1, 0.5, 0.9)
ALL_METHODS = ("retrain", "rw_retrain", "rw_retrain_loss", "l1_sparse", "rw_l1_sparse", "salun",
               "rw_salun", "scrub", "rw_scrub", "miu", "miu_no_rw", "sw_rw_retrain", "sw_miu")
LABELS = {"original": "Original", "retrain": "Retrain", "rw_retrain": "RW retrain (sampler)",
          "rw_retrain_loss": "RW retrain (loss weights)", "l1_sparse": "L1-sparse",
          "rw_l1_sparse": "RW L1-sparse", "salun": "SalUn", "rw_salun": "RW SalUn",
          "scrub": "SCRUB", "rw_scrub": "RW SCRUB", "miu": "MIU", "miu_no_rw": "MIU (no RW)",
          "sw_rw_retrain": "RW+SW retrain", "sw_miu": "MIU+SW"}
REFERENCES = ("rw_retrain", "retrain")  # Avg. Gap / ToW references, headline first


@dataclasses.dataclass(frozen=True)
class Config:
    """``datasets``: one :class:`DatasetConfig` dict per dataset; ``ablation``: ``dict(dataset,
    ratio, mine_steps)`` for the MIU quirk ablation (first seed only), or None; ``seeds``: how many
    seeds (``--seed``, ``--seed`` + 1, ...) one run loops over; each seed draws its own forget set,
    initialisation and batch order, and every (seed, dataset, ratio) cell is resumable."""

    datasets: tuple = ()
    ratios: tuple = RATIOS
    methods: tuple = ALL_METHODS
    ablation: dict | None = None
    seeds: int = 1  # seeds base, base + 1, ...; claims need >= 2 (5 documented)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of a config: the loader, the forget cell and the recipes.

    ``model``: ``dict(kind, hidden | width)`` (:func:`common.build_model`); ``train``: the
    original/retrain recipe ``dict(optimizer, lr, epochs, batch_size, l2[, momentum,
    weight_decay])`` (cosine decay); ``unlearn``: ``dict(epochs, batch_size)``; ``miu``: MIU's
    ``lambda_mi, forget_epochs, tune_steps_first, tune_steps_epoch, mine_optimizer=(name, lr)``
    and optionally ``mine_hidden, model_lr, tune_subset``; ``soft_l2``: the soft-weight surrogate's
    L2; ``eo_binarize``: De Min's FairFace EO (:func:`evaluate`).
    """

    name: str
    loader: str
    target: int
    sensitive: int
    model: dict
    train: dict
    unlearn: dict
    miu: dict
    size: int | None = None
    input: str = "memory"  # "stream": TFDS images read batch by batch (common.check_input)
    soft_l2: float = 1e-3
    eo_binarize: bool = False


# ----------------------------------------------------------------------------- checks and data

def validate(cfg: Config) -> None:
    """Refuse a config before any compute (:func:`experiments.common.check_config`)."""
    common.check_number("seeds", cfg.seeds, low=1, integer=True)
    check_ratios(cfg.ratios)
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"config methods: unknown {unknown}; choose from {ALL_METHODS}")
    if not cfg.datasets:
        raise ValueError("config datasets: the config names no dataset")
    for d in cfg.datasets:
        try:
            spec = DatasetConfig(**d)
        except TypeError as e:
            raise ValueError(f"config datasets: a dataset entry is malformed ({e})") from None
        for part in ("train", "unlearn"):
            recipe = getattr(spec, part)
            for k in ("epochs", "batch_size"):
                common.check_number(f"datasets[{spec.name!r}].{part}[{k!r}]", recipe.get(k), low=1,
                                    integer=True)
        common.check_number(f"datasets[{spec.name!r}].train['lr']", spec.train.get("lr"), low=0,
                            low_open=True)
        common.check_number(f"datasets[{spec.name!r}].train['l2']", spec.train.get("l2", 0.0), low=0)
        common.check_number(f"datasets[{spec.name!r}].soft_l2", spec.soft_l2, low=0)


def check_ratios(ratios) -> tuple[float, ...]:
    """Forget ratios as floats; a ValueError for any outside (0, 1]."""
    out = []
    for r in ratios:
        r = float(r)
        if not 0.0 < r <= 1.0:  # (NaN fails too)
            raise ValueError(f"forget ratio {r} is outside (0, 1]")
        out.append(r)
    if not out:
        raise ValueError("no forget ratio given")
    return tuple(out)


def load_dataset(spec: DatasetConfig, data_dir=None):
    """The dataset (group-robust studies need a sensitive attribute with >= 2 values); image
    datasets are flattened for an MLP."""
    ds = common.load_dataset(spec.loader, data_dir=data_dir, image_size=spec.size, input=spec.input)
    if ds.num_groups < 2:
        raise ValueError(f"{ds.name} has no sensitive attribute (num_groups = {ds.num_groups}); "
                         "group-robust unlearning needs group labels")
    if spec.model["kind"] == "mlp" and len(ds.input_shape) > 1:
        ds = dataclasses.replace(ds, **{k: {**s, "x": s["x"].reshape(s["x"].shape[0], -1)}
                                        for k, s in ds.splits.items()})
    return ds


def forget_rows(ds, spec: DatasetConfig, ratios, seed: int) -> dict:
    """Forget rows for each ratio (validated before any training: absent cell, bad ratio)."""
    return {r: data.forget_group(ds.train, target=spec.target, group=spec.sensitive, fraction=r,
                                 key=(seed, int(round(r * 1000)))) for r in check_ratios(ratios)}


def optimizer(recipe: dict, n: int):
    """The recipe's optimizer, cosine-decayed over its epochs on ``n`` samples."""
    return common.make_optimizer(recipe["optimizer"], recipe["lr"],
                                 steps=recipe["epochs"] * data.num_batches(n, recipe["batch_size"]),
                                 momentum=recipe.get("momentum"),
                                 weight_decay=recipe.get("weight_decay", 0.0))


# ----------------------------------------------------------------------------- evaluation

def evaluate(apply_fn, variables, sets: dict, *, target: int, sensitive: int,
             eo_binarize: bool = False) -> dict:
    """The paper's metrics of one model, as fractions.

    Args:
      apply_fn, variables: the model.
      sets: ``{"retain", "forget", "val", "test"}`` splits (test and val need ``"group"``).
      target, sensitive: the forget cell (group accuracy is the test accuracy on it).
      eo_binarize: De Min's FairFace EO: target ``y == target`` vs not, group ``s == sensitive``
        vs not (the cell accuracy stays the K-way accuracy).
    """
    logits = {k: evaluation.predict(apply_fn, variables, sets[k]["x"])[0] for k in sets}
    y = {k: np.asarray(sets[k]["y"]) for k in sets}
    if sets["test"].get("group") is None:
        raise ValueError("group labels missing: EO, group and worst-group accuracy need the test "
                         "split's 'group' array")
    g_test = np.asarray(sets["test"]["group"])
    out = {f"{k}_accuracy": metrics.accuracy(logits[k], y[k]) for k in ("retain", "forget", "test")}
    sc = {k: metrics.membership_scores(logits[k], y[k]) for k in sets}
    attack = metrics.mia(sc["retain"], sc["val"], sc["forget"], heldout_scores=sc["test"])
    out.update(mia=attack["forget_nonmember_rate"], mia_auc=attack["auc"],
               mia_attack_auc=attack["attack_auc"])
    if eo_binarize:
        k = max(2, int(np.asarray(logits["test"]).shape[1]))
        others = [c for c in range(k) if c != target]
        out["eo"] = metrics.equalized_odds(logits["test"], y["test"], (g_test == sensitive).astype(np.int32),
                                           target_partition=[others, [target]])
    else:
        out["eo"] = metrics.equalized_odds(logits["test"], y["test"], g_test)
    cell = (y["test"] == target) & (g_test == sensitive)
    if not cell.any():
        raise ValueError(f"the test split has no sample of the forget cell (class {target}, "
                         f"group {sensitive}); group accuracy is undefined")
    out["group_accuracy"] = metrics.accuracy(logits["test"][cell], y["test"][cell])
    cells = g_test.astype(np.int64) + y["test"].astype(np.int64) * (int(g_test.max()) + 1)
    out["worst_group_accuracy"] = metrics.worst_group_accuracy(logits["test"], y["test"], cells)
    return out


NO_MIA = tuple(k for k in metrics.GAP_KEYS if k != "mia")


def add_gaps(rows: dict) -> None:
    """Add Avg. Gap, Avg. Gap without MIA and ToW against each available reference (in place).

    The MIA term is reported separately because a loss-threshold attack on a model that barely
    overfits (attack AUC near 0.5) puts its threshold almost anywhere, so the forget non-member
    rate swings by tens of points between near-identical models and dominates the paper's gap.
    """
    for ref in REFERENCES:
        if ref not in rows or "error" in rows[ref]:
            continue
        for name, row in rows.items():
            if "error" in row:
                continue
            row[f"avg_gap_{ref}"] = metrics.avg_gap(row, rows[ref])
            row[f"avg_gap_nomia_{ref}"] = metrics.avg_gap(row, rows[ref], keys=NO_MIA)
            row[f"tow_{ref}"] = metrics.tow(row, rows[ref])


def guarded(name: str, fn) -> dict:
    """Run ``fn() -> row``; a divergence (a diverged MI estimate or loss) becomes a reported row.

    ``MIDivergenceError`` and the loops' NaN-loss errors are ``FloatingPointError``s; the row then
    holds ``"error"`` and is shown as such in the report. Bad input (ValueError) is not caught.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        row = fn()
    except FloatingPointError as e:
        row = {"error": f"{type(e).__name__}: {e}"}
    row.setdefault("method", name)
    row["seconds"] = time.perf_counter() - t0
    row["cpu_seconds"] = time.process_time() - c0
    return row


# ----------------------------------------------------------------------------- soft weights

def soft_retain_weights(apply_fn, variables, retain: dict, val: dict, base_weight, *, target: int,
                        num_groups: int, num_outputs: int, l2: float) -> tuple[np.ndarray, dict]:
    """Seed-004 soft weights eps [n_r] for the retain samples (beyond the paper).

    Surrogate: the last layer refit (L2 ``l2``, intercept) on the original model's retain features
    with loss weights ``base_weight``. Measurement: the validation EO surrogate of the forget cell's
    class, ``max_s mean_{s, y=target} CE - min_s ...`` (the loss gap between sensitive groups);
    utility: the mean validation loss. Influence scores (predicted change on removal) times each
    sample's weight give ``I_metric``, ``I_util``; ``soft_weights(variant="min_norm",
    delta=|f0|)`` asks for a first-order metric change of ``-|f0|`` at unchanged utility. The
    result is scaled by ``t = min(1, 1 / max(-eps))`` so that every sampling weight
    ``base_weight (1 + eps)`` is >= 0 (the QP's feasible set is convex and holds 0, so the scaled
    eps stays feasible; its predicted change is scaled by t).
    """
    feats_r = jnp.asarray(evaluation.predict(apply_fn, variables, retain["x"])[1], jnp.float64
                          if jax.config.jax_enable_x64 else jnp.float32)
    feats_v = jnp.asarray(evaluation.predict(apply_fn, variables, val["x"])[1], feats_r.dtype)
    w = jnp.asarray(base_weight, feats_r.dtype)
    head, fit_info = last_layer.refit_head(feats_r, jnp.asarray(retain["y"]), l2=l2,
                                           num_outputs=num_outputs, fit_intercept=True, weight=w)
    problem = last_layer.make_problem(head, {"x": feats_r, "y": jnp.asarray(retain["y"]), "weight": w}, l2=l2)
    vb = {"x": feats_v, "y": jnp.asarray(val["y"]), "group": jnp.asarray(val["group"])}
    measure = measurements.equal_opportunity(last_layer.head_apply, num_groups=num_groups,
                                             classes=[target], aggregate="range")
    util = measurements.utility(last_layer.head_apply)
    res = scores.influence_scores(problem, {"metric": (measure, vb), "util": (util, vb)},
                                  on_nonstationary="raise", stationarity_tol=1e-3)
    i_metric = np.asarray(res.scores["metric"]) * np.asarray(w)
    i_util = np.asarray(res.scores["util"]) * np.asarray(w)
    f0 = res.values["metric"]
    eps, info = weights.soft_weights(i_metric, i_util, delta=abs(f0), variant="min_norm")
    eps = np.asarray(eps, np.float64)
    scale = min(1.0, 1.0 / max(float(-eps.min()), 1e-12))
    eps = eps * scale
    summary = {"surrogate_metric": f0, "surrogate_grad_norm": float(fit_info.grad_norm),
               "case": int(info["case"]), "degenerate": bool(info["degenerate"]), "scale": scale,
               "predicted_metric_change": float(info["metric_change"]) * scale,
               "predicted_utility_change": float(info["utility_change"]) * scale,
               "eps_min": float(eps.min()), "eps_max": float(eps.max()),
               "eps_mean_abs": float(np.abs(eps).mean())}
    return eps.astype(np.float32), summary


# ----------------------------------------------------------------------------- one study

class Study:
    """Everything one dataset shares: model, initial variables, compiled programs, recipes."""

    def __init__(self, spec: DatasetConfig, ds, *, seed: int, progress: bool):
        self.spec, self.ds, self.seed, self.progress = spec, ds, seed, progress
        self.model = common.build_model(spec.model["kind"], ds.input_shape, ds.num_classes,
                                        **{k: v for k, v in spec.model.items() if k != "kind"})
        self.key = jax.random.key(seed)
        self.init_vars = self.model.init(jax.random.fold_in(self.key, 0), ds.train["x"][:1])
        self._programs = {}

    def fresh(self):
        """A copy of the initial variables (kept apart from any run's buffers)."""
        return jax.tree.map(jnp.copy, self.init_vars)

    def train_original(self, ckpt_dir: str) -> tuple[dict, dict]:
        """The original model, resumed from / checkpointed to ``ckpt_dir`` every epoch."""
        tr = self.spec.train
        ck = checkpoint.Checkpointer(ckpt_dir)
        try:
            variables, history = common.train_model(
                self.model, self.ds.train, optimizer(tr, len(self.ds.train["y"])),
                epochs=tr["epochs"], batch_size=tr["batch_size"], l2=tr["l2"], init_key=None,
                variables=self.fresh(), key=jax.random.fold_in(self.key, 1), checkpoints=ck,
                progress=self.progress)
        finally:
            ck.close()
        return variables, {"seconds": float(sum(h["seconds"] for h in history)),
                           "final_loss": history[-1]["loss"]}

    def sets(self, rows) -> dict:
        forget, retain = data.forget_retain_splits(self.ds.train, rows)
        forget = {**forget, "weight": -np.ones(len(forget["y"]), np.float32)}  # hard removal
        return {"forget": forget, "retain": retain, "val": self.ds.val, "test": self.ds.test}

    def evaluate(self, variables, sets) -> dict:
        return evaluate(self.model.apply, variables, sets, target=self.spec.target,
                        sensitive=self.spec.sensitive, eo_binarize=self.spec.eo_binarize)

    def program(self, name: str, make):
        """One compiled :class:`~jaxunlearn.loop.Program` per name and dataset, so the plain and
        reweighted runs (and the MIU variants) share one compilation."""
        if name not in self._programs:
            self._programs[name] = loop.compile(make(), mesh=common.MESH)
        return self._programs[name]

    def retrain(self, retain, *, weight=None, sampling=None):
        tr = self.spec.train
        n = len(retain["y"])  # the cosine horizon depends on |D_r|: one program per retain size
        program = self.program(f"retrain/{n}", lambda: M.retrain(self.model.apply, optimizer(tr, n),
                                                                  l2=tr["l2"]))
        split = retain if weight is None else {**retain, "weight": weight}
        variables, _, _ = loop.run(program, self.fresh(), {"retain": split}, epochs=tr["epochs"],
                                   batch_size=tr["batch_size"], key=jax.random.fold_in(self.key, 2),
                                   sampling=sampling, progress=self.progress)
        return variables

    def unlearn(self, method, original, sets, *, sampling=None, key_id=3):
        un = self.spec.unlearn
        return loop.run(method, original, {"forget": sets["forget"], "retain": sets["retain"]},
                        epochs=un["epochs"], batch_size=un["batch_size"],
                        key=jax.random.fold_in(self.key, key_id), sampling=sampling,
                        mesh=common.MESH, progress=self.progress)

    def run_miu(self, original, sets, sampling, *, original_estimator_features="original",
                estimator_updates="tuning"):
        """MIU (or one of its quirk variants) from ``original``: ``(variables, state, diagnostics)``."""
        method = self.program(f"miu/{original_estimator_features}/{estimator_updates}",
                              lambda: self._make_miu(original_estimator_features, estimator_updates))
        variables, state, _ = self.unlearn(method, original, sets, sampling=sampling, key_id=5)
        return variables, state, miu_lib.check_estimators(state)

    def _make_miu(self, original_estimator_features, estimator_updates):
        c, un = self.spec.miu, self.spec.unlearn
        train_split = self.ds.train
        sub = c.get("tune_subset")
        if sub is not None and sub < len(train_split["y"]):
            idx = np.sort(np.random.default_rng(self.seed).choice(len(train_split["y"]), sub, replace=False))
            train_split = data.take(train_split, idx)
        kw = {}
        if c.get("model_lr") is not None:
            steps = un["epochs"] * data.num_batches(len(self.ds.train["y"]), un["batch_size"])
            kw["optimizer"] = common.make_optimizer("sgd", c["model_lr"], steps=steps, momentum=0.9,
                                                    weight_decay=1e-4)
        if common.MESH is not None:  # split the estimator tuning batches over the data axis too
            kw["tune_sharding"] = jax.sharding.NamedSharding(
                common.MESH, jax.sharding.PartitionSpec(sharding.data_axis(common.MESH)))
        name, lr = c["mine_optimizer"]
        return miu_lib.miu(
            self.model.apply, train_split, num_classes=self.ds.num_classes,
            num_sensitive=self.ds.num_groups, key=jax.random.fold_in(self.key, 4),
            lambda_mi=c["lambda_mi"], forget_epochs=c["forget_epochs"],
            tune_steps_first=c["tune_steps_first"], tune_steps_epoch=c["tune_steps_epoch"],
            tune_batch_size=un["batch_size"],
            mine_optimizer=optax.adam(lr) if name == "adam" else optax.sgd(lr, momentum=0.9),
            mine_hidden=c.get("mine_hidden", 512),
            original_estimator_features=original_estimator_features,
            estimator_updates=estimator_updates, **kw)


def run_cell(study: Study, original, rows, ratio: float, methods_to_run, ablation=None) -> dict:
    """All methods for one forget ratio (and the MIU quirk ablation when asked for): the cell's
    row ``{"rows": {method: metrics row}, "info": {...}[, "ablation": {...}]}``."""
    ds, spec, apply_fn = study.ds, study.spec, study.model.apply
    sets = study.sets(rows)
    n = len(ds.train["y"])
    retain_mask = ~data.forget_mask(n, rows)
    w_all = weights.group_weights(ds.train["y"], ds.train["group"], retain_mask,
                                  num_sensitive=ds.num_groups)
    w_r = w_all[retain_mask]
    w_r_loss = w_r / w_r.mean()
    in_cell = (sets["retain"]["y"] == spec.target) & (sets["retain"]["group"] == spec.sensitive)
    info = {"n_forget": int(len(rows)), "n_retain": int(retain_mask.sum()),
            "forget_cell_weight": float(w_r[in_cell][0]) if in_cell.any() else None}
    t0 = time.perf_counter()
    out = {"original": {**study.evaluate(original, sets), "seconds": 0.0}}
    out["original"]["eval_seconds"] = time.perf_counter() - t0
    ev = lambda v: study.evaluate(v, sets)

    def approx(make, sampling):
        return lambda: ev(study.unlearn(make(), original, sets, sampling=sampling)[0])

    salun_program = []

    def salun():  # the saliency mask depends on the forget set: one SalUn per ratio
        if not salun_program:
            mask = M.saliency_mask(apply_fn, original, sets["forget"], threshold=0.5)
            salun_program.append(loop.compile(M.salun(apply_fn, mask), mesh=common.MESH))
        return salun_program[0]

    miu_run = {}  # the main MIU row's run, reused by the quirk ablation

    def miu_row(sampling, keep=False):
        def fn():
            v, state, diag = study.run_miu(original, sets, sampling)
            if keep:
                miu_run.update(variables=v, state=state)
            return {**ev(v), "estimators": diag}
        return fn

    eps = None
    if any(m.startswith("sw_") for m in methods_to_run):
        try:
            eps, info["soft_weights"] = soft_retain_weights(
                apply_fn, original, sets["retain"], sets["val"], w_r_loss, target=spec.target,
                num_groups=ds.num_groups, num_outputs=study.model.num_outputs, l2=spec.soft_l2)
        except ValueError as e:
            info["soft_weights"] = {"error": f"{type(e).__name__}: {e}"}
    sw = None if eps is None else w_r * (1.0 + eps)

    l1 = lambda: study.program("l1_sparse", lambda: M.l1_sparse(apply_fn, epochs=spec.unlearn["epochs"]))
    scrub = lambda: study.program("scrub", lambda: M.scrub(apply_fn))
    jobs = {
        "retrain": lambda: ev(study.retrain(sets["retain"])),
        "rw_retrain": lambda: ev(study.retrain(sets["retain"], sampling=w_r)),
        "rw_retrain_loss": lambda: ev(study.retrain(sets["retain"], weight=w_r_loss)),
        "l1_sparse": approx(l1, None),
        "rw_l1_sparse": approx(l1, w_r),
        "salun": approx(salun, None),
        "rw_salun": approx(salun, w_r),
        "scrub": approx(scrub, None),
        "rw_scrub": approx(scrub, w_r),
        "miu": miu_row(w_r, keep=True),
        "miu_no_rw": miu_row(None),
        "sw_rw_retrain": lambda: ev(study.retrain(sets["retain"], sampling=sw)),
        "sw_miu": miu_row(sw),
    }
    for name in methods_to_run:
        if name.startswith("sw_") and sw is None:
            out[name] = {"method": name, "error": "soft weights unavailable: "
                         + str(info.get("soft_weights", {}).get("error", "not computed"))}
            continue
        out[name] = guarded(name, jobs[name])
        if study.progress:
            row = out[name]
            msg = row.get("error") or (f"test {row['test_accuracy']:.4f} forget {row['forget_accuracy']:.4f} "
                                       f"group {row['group_accuracy']:.4f}")
            print(f"    {name:16s} {msg} ({row['seconds']:.1f} s)", flush=True)
    for name, row in out.items():
        row["method"] = name
    add_gaps(out)
    cell = {"rows": out, "info": info}
    if ablation is not None:
        if study.progress:
            print(f"[{spec.name}] MIU quirk ablation at r = {ratio}", flush=True)
        cell["ablation"] = {"ratio": ratio, **quirk_ablation(
            study, original, sets, w_r, out, miu_run, mine_steps=ablation["mine_steps"])}
    return cell


# ----------------------------------------------------------------------------- quirk ablation

def _final_dv(est: mi.MineState, z, c, key, draws: int = 4) -> float:
    vals = [float(mi.dv_bound(est.params, jnp.asarray(z), c, mi.sample_marginal(k, c, marginal="uniform")))
            for k in jax.random.split(key, draws)]
    return float(np.mean(vals))


def quirk_ablation(study: Study, original, sets, w_r, ratio_rows: dict, miu_run: dict, *,
                   mine_steps: int) -> dict:
    """MIU under the reference's two quirks vs the decisions of ``methods.miu`` (measured).

    Variants: ``default`` (T_orig tuned on original features; estimators frozen between tuning
    phases; the main MIU row's run ``miu_run`` when there is one), ``reference`` (T_orig tuned on
    the unlearned model's features), ``every_step`` (estimators also ascend on every retain
    batch). For each: the estimators' final DV estimates on the whole retain set, a fresh MINE
    (``estimate_mi``, ``mine_steps`` steps, uniform c~) on the same features as the reference
    value, and the downstream metrics.
    """
    ds, apply_fn = study.ds, study.model.apply
    retain = sets["retain"]
    c = jnp.asarray(np.eye(ds.num_classes * ds.num_groups, dtype=np.float32)[
        retain["group"] + retain["y"] * ds.num_groups])
    key = jax.random.fold_in(study.key, 7)
    z_orig = evaluation.predict(apply_fn, original, retain["x"])[1]
    fresh_orig = mi.estimate_mi(z_orig, c, key=jax.random.fold_in(key, 0), steps=mine_steps,
                                batch_size=512, marginal="uniform")
    out = {"fresh_mi_original": fresh_orig, "variants": {}}
    variants = {"default": {}, "reference": {"original_estimator_features": "unlearned"},
                "every_step": {"estimator_updates": "every_step"}}
    for i, (name, flags) in enumerate(variants.items()):
        t0 = time.perf_counter()
        reuse = name == "default" and bool(miu_run)
        if reuse:
            v, state = miu_run["variables"], miu_run["state"]
        else:
            try:
                v, state, _ = study.run_miu(original, sets, w_r, **flags)
            except FloatingPointError as e:
                out["variants"][name] = {"flags": flags, "error": f"{type(e).__name__}: {e}"}
                continue
        z_unl = evaluation.predict(apply_fn, v, retain["x"])[1]
        est_u, est_o = state.extra["estimator_unlearned"], state.extra["estimator_original"]
        row = {"flags": flags,
               "seconds": ratio_rows["miu"]["seconds"] if reuse else time.perf_counter() - t0,
               "mi_unlearned_estimator": _final_dv(est_u, z_unl, c, jax.random.fold_in(key, 10 + i)),
               "mi_original_estimator": _final_dv(est_o, z_orig, c, jax.random.fold_in(key, 20 + i)),
               "fresh_mi_unlearned": mi.estimate_mi(z_unl, c, key=jax.random.fold_in(key, 30 + i),
                                                    steps=mine_steps, batch_size=512,
                                                    marginal="uniform"),
               **study.evaluate(v, sets)}
        for ref in REFERENCES:
            if ref in ratio_rows and "error" not in ratio_rows[ref]:
                row[f"avg_gap_{ref}"] = metrics.avg_gap(row, ratio_rows[ref])
                row[f"avg_gap_nomia_{ref}"] = metrics.avg_gap(row, ratio_rows[ref], keys=NO_MIA)
        out["variants"][name] = row
    return out


# ----------------------------------------------------------------------------- report

HEAD = {"retain_accuracy": "RA", "forget_accuracy": "FA", "test_accuracy": "TA", "mia": "MIA",
        "mia_auc": "MIA AUC", "eo": "EO", "group_accuracy": "GA", "worst_group_accuracy": "WGA",
        "tow_rw_retrain": "ToW", "avg_gap_rw_retrain": "Gap (RW)",
        "avg_gap_nomia_rw_retrain": "Gap-MIA (RW)", "avg_gap_retrain": "Gap (retrain)"}


def table_rows(rows: dict) -> list[dict]:
    out = []
    for name, row in rows.items():
        r = {"method": LABELS.get(name, name)}
        if "error" in row:
            r["RA"] = "error: " + row["error"][:120]
        else:
            r.update({head: 100.0 * row[k] for k, head in HEAD.items() if k in row})
        r["s"] = row.get("seconds", float("nan"))
        out.append(r)
    return out


def claim_check(per_ratio: dict) -> list[dict]:
    """The paper's claim per ratio: MIU vs L1-sparse, SalUn, SCRUB (plain and RW).

    The original model (no unlearning at all) is listed too, as the trivial baseline.
    """
    out = []
    for ratio, rows in per_ratio.items():
        miu = rows.get("miu", {})
        if "error" in miu or "avg_gap_rw_retrain" not in miu:
            continue
        for base in ("l1_sparse", "rw_l1_sparse", "salun", "rw_salun", "scrub", "rw_scrub",
                     "original"):
            b = rows.get(base)
            if b is None or "error" in b:
                continue
            out.append({"ratio": ratio, "baseline": LABELS[base],
                        "MIU gap": 100 * miu["avg_gap_rw_retrain"],
                        "baseline gap": 100 * b["avg_gap_rw_retrain"],
                        "MIU lower gap": miu["avg_gap_rw_retrain"] < b["avg_gap_rw_retrain"],
                        "MIU gap-MIA": 100 * miu["avg_gap_nomia_rw_retrain"],
                        "baseline gap-MIA": 100 * b["avg_gap_nomia_rw_retrain"],
                        "MIU lower gap-MIA": miu["avg_gap_nomia_rw_retrain"] < b["avg_gap_nomia_rw_retrain"],
                        "MIU GA": 100 * miu["group_accuracy"], "baseline GA": 100 * b["group_accuracy"],
                        "MIU higher GA": miu["group_accuracy"] > b["group_accuracy"]})
    return out


# ----------------------------------------------------------------------------- seeds and claims

BASELINES = ("l1_sparse", "rw_l1_sparse", "salun", "rw_salun", "scrub", "rw_scrub")


def seed_values(cells: list[dict], dataset: str, ratio: float, seeds) -> dict:
    """``{method: {metric: [one value per seed]}}`` of one (dataset, ratio), for the methods that
    ran without error in every seed."""
    per = {c["seed"]: c["rows"] for c in cells if c["dataset"] == dataset and c["ratio"] == ratio}
    if sorted(per) != sorted(seeds):
        raise ValueError(f"{dataset} r = {ratio}: cells for seeds {sorted(per)}, expected {seeds}")
    names = [m for m in per[seeds[0]] if all(m in per[s] and "error" not in per[s][m] for s in seeds)]
    keys = [k for k in HEAD if all(k in per[s][m] for m in names for s in seeds)]
    keys += [k for k in ("mia_attack_auc",) if all(k in per[s].get("original", {}) for s in seeds)]
    return {m: {k: [per[s][m][k] for s in seeds] for k in keys if all(k in per[s][m] for s in seeds)}
            for m in names}


def _compare(vals: dict, a: str, b: str, key: str, *, higher_is_better: bool) -> dict | None:
    if a not in vals or b not in vals or key not in vals[a] or key not in vals[b]:
        return None
    return stats.paired(vals[a][key], vals[b][key], higher_is_better=higher_is_better)


def _pct(ci: dict) -> str:
    return stats.fmt_ci({k: 100 * v if isinstance(v, float) else v for k, v in ci.items()})


def _combine(verdicts: list) -> bool | str:
    """A claim over several cells: true if it holds in all, false if it fails in any (the
    interval lies on the wrong side), otherwise inconclusive."""
    if verdicts and all(v is True for v in verdicts):
        return True
    if any(v is False for v in verdicts):
        return False
    return "inconclusive"


def analyse(cells: list[dict], specs, ratios, seeds) -> dict:
    """Seed-level tables (mean ± 95 % CI per method and metric), MIU against every baseline
    (paired over seeds), and the ``paper_comparison`` entries, per dataset over its ratios."""
    out = {"seeds": list(seeds), "datasets": {}, "paper_comparison": []}
    tag = f"{len(seeds)} seed{'s' * (len(seeds) > 1)}"
    for spec in specs:
        per_ratio = {}
        for r in ratios:
            vals = seed_values(cells, spec.name, r, list(seeds))
            table = {m: {k: stats.mean_ci(v) for k, v in mv.items()} for m, mv in vals.items()}
            comp = {}
            for base in (*BASELINES, "original", "miu_no_rw"):
                gap = _compare(vals, "miu", base, "avg_gap_rw_retrain", higher_is_better=False)
                if gap is None:
                    continue
                comp[base] = {"avg_gap_rw_retrain": gap,
                              "avg_gap_nomia_rw_retrain": _compare(
                                  vals, "miu", base, "avg_gap_nomia_rw_retrain",
                                  higher_is_better=False),
                              "group_accuracy": _compare(vals, "miu", base, "group_accuracy",
                                                         higher_is_better=True)}
            per_ratio[str(r)] = {"table": table, "miu_vs": comp,
                                 "retrain_vs_original_ga": _compare(
                                     vals, "retrain", "original", "group_accuracy",
                                     higher_is_better=True),
                                 "rw_vs_retrain_ga": _compare(vals, "rw_retrain", "retrain",
                                                              "group_accuracy",
                                                              higher_is_better=True)}
        out["datasets"][spec.name] = per_ratio
        out["paper_comparison"] += _claims(spec.name, per_ratio, tag)
    return out


def _claims(dataset: str, per_ratio: dict, tag: str) -> list[dict]:
    """The paper's headline claims for one dataset, each checked at every ratio."""
    claims = []

    def one(name, paper, pick, expect, describe):
        parts, verdicts = [], []
        for r, pr in per_ratio.items():
            p = pick(pr)
            if p is None:
                continue
            v = stats.verdict(p["diff"]["lo"], p["diff"]["hi"], expect=expect)
            verdicts.append(v)
            parts.append(f"r={r}: {describe(pr, p)} [{'yes' if v is True else 'no' if v is False else 'inconclusive'}]")
        if parts:
            claims.append(stats.claim(f"{name} ({dataset}, {tag})", paper, "; ".join(parts),
                                      _combine(verdicts)))

    diff = lambda p: f"diff {_pct(p['diff'])} pts (p = {p['p']:.3g}, won {p['wins']}/{p['n']})"
    one("Plain retraining lowers the forget cell's group accuracy",
        "a group-skewed forget set degrades the dominant group under retraining",
        lambda pr: pr["retrain_vs_original_ga"], "negative",
        lambda pr, p: f"GA retrain - original {diff(p)}")
    one("Reweighted retraining restores group accuracy over plain retraining",
        "sample-distribution reweighting mitigates the group-accuracy loss",
        lambda pr: pr["rw_vs_retrain_ga"], "positive",
        lambda pr, p: f"GA RW retrain - retrain {diff(p)}")
    # MIU against the six approximate baselines: one verdict per ratio over all baselines
    for key, expect, paper, name in (
            ("avg_gap_rw_retrain", "negative",
             "MIU outperforms L1-sparse, SalUn, SCRUB (Avg. Gap to the reweighted retrain)",
             "MIU has a lower Avg. Gap to the RW retrain than every baseline"),
            ("group_accuracy", "positive",
             "MIU preserves the dominant group's accuracy better than the baselines",
             "MIU has a higher group accuracy than every baseline")):
        parts, verdicts = [], []
        for r, pr in per_ratio.items():
            vs = {b: c[key] for b, c in pr["miu_vs"].items() if b in BASELINES and c[key]}
            if not vs:
                continue
            each = {b: stats.verdict(p["diff"]["lo"], p["diff"]["hi"], expect=expect)
                    for b, p in vs.items()}
            verdicts.append(_combine(list(each.values())))
            won = ", ".join(f"{LABELS[b]} {p['wins']}/{p['n']}" for b, p in vs.items())
            parts.append(f"r={r}: MIU {_pct(pr['table']['miu'][key])}; significantly better than "
                         f"{sum(x is True for x in each.values())}/{len(each)}, worse than "
                         f"{sum(x is False for x in each.values())}/{len(each)} (seeds won: {won})")
        if parts:
            claims.append(stats.claim(f"{name} ({dataset}, {tag})", paper, "; ".join(parts),
                                      _combine(verdicts)))
    one("MIU is closer to the RW retrain than the untouched original model",
        "unlearning with MIU approaches the group-robust retrain (implied)",
        lambda pr: pr["miu_vs"].get("original", {}).get("avg_gap_rw_retrain"), "negative",
        lambda pr, p: f"Avg. Gap MIU {_pct(pr['table']['miu']['avg_gap_rw_retrain'])} vs "
                      f"original {_pct(pr['table']['original']['avg_gap_rw_retrain'])}, {diff(p)}")
    one("Reweighting helps MIU (MIU vs MIU without RW)",
        "MIU exploits sample-distribution reweighting",
        lambda pr: pr["miu_vs"].get("miu_no_rw", {}).get("avg_gap_rw_retrain"), "negative",
        lambda pr, p: f"Avg. Gap MIU - MIU (no RW) {diff(p)}")
    return claims


def seed_report(analysis: dict) -> list[str]:
    """Mean ± 95 % CI tables per dataset and ratio, and MIU against every baseline."""
    seeds = analysis["seeds"]
    lines = [f"## Over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): mean ± 95 % CI, percent\n",
             "MIU vs X: paired differences over seeds (MIU - X, percentage points), paired t-test p "
             "and the seeds MIU won (lower Avg. Gap, higher GA). MIA AUC: the attack's AUC "
             "separating D_f from held-out data; attack AUC: retain vs validation (50 = no "
             "signal).\n"]
    for dname, per_ratio in analysis["datasets"].items():
        lines.append(f"### {dname}\n")
        for r, pr in per_ratio.items():
            lines.append(f"#### r = {r}\n")
            rows = []
            for m, t in pr["table"].items():
                row = {"method": LABELS.get(m, m)}
                row.update({head: _pct(t[k]) for k, head in HEAD.items() if k in t})
                rows.append(row)
            lines.append(common.markdown_table(rows))
            if "mia_attack_auc" in pr["table"].get("original", {}):
                lines.append(f"MIA attack AUC of the original model: "
                             f"{_pct(pr['table']['original']['mia_attack_auc'])}.\n")
            crow = []
            for b, c in pr["miu_vs"].items():
                row = {"MIU vs": LABELS.get(b, b)}
                for key, head in (("avg_gap_rw_retrain", "Gap (RW)"),
                                  ("avg_gap_nomia_rw_retrain", "Gap-MIA (RW)"),
                                  ("group_accuracy", "GA")):
                    p = c.get(key)
                    if p:
                        row[f"{head} diff"] = _pct(p["diff"])
                        row[f"{head} p"] = f"{p['p']:.3g}"
                        row[f"{head} won"] = f"{p['wins']}/{p['n']}"
                crow.append(row)
            if crow:
                lines.append(common.markdown_table(crow))
    return lines


def plot_group_accuracy(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, dname in zip(axes[0], names):
        per_ratio = results["datasets"][dname]["ratios"]
        ratios = sorted(float(r) for r in per_ratio)
        methods = [m for m in ("original", *ALL_METHODS) if any(m in per_ratio[str(r)] for r in ratios)]
        colors = plt.cm.tab20(np.linspace(0, 1, 20))
        for m in methods:
            color = colors[("original", *ALL_METHODS).index(m) % 20]
            ys = [100 * per_ratio[str(r)][m]["group_accuracy"]
                  if m in per_ratio[str(r)] and "group_accuracy" in per_ratio[str(r)][m] else np.nan
                  for r in ratios]
            style = "-" if m.startswith(("miu", "sw_miu")) else ("--" if "retrain" in m else ":")
            ax.plot(ratios, ys, style, marker="o", color=color, label=LABELS.get(m, m))
        ax.set_xlabel("forget ratio r")
        ax.set_ylabel("group accuracy (test, forget cell) [%]")
        ax.set_title(dname)
        ax.set_xticks(ratios)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    common.savefig(fig, path)


def write_report(results: dict, out: str) -> str:
    """``report.md``: the paper comparison first, the seed-level tables, then the first seed's
    per-ratio tables, claim check and ablation."""
    analysis = results["analysis"]
    lines = [f"# Group-robust unlearning ({results['preset']} preset)\n", "## Paper vs ours\n",
             stats.comparison_table(analysis["paper_comparison"]),
             "A claim over several ratios holds when it holds at every ratio, fails when its "
             "interval lies on the wrong side at any ratio, and is inconclusive otherwise; MIU "
             "against the baselines holds at a ratio when it is significantly better than each.\n",
             *seed_report(analysis),
             f"## First seed ({results['seeds'][0]}) in detail\n",
             "Percent. RA/FA/TA: retain/forget/test accuracy; MIA: forget non-member rate; EO: "
             "De Min's equalized odds; GA: test accuracy on the forget cell; WGA: worst (target, "
             "sensitive) test cell; ToW and Gap (RW) = Avg. Gap against the reweighted (sampler) "
             "retrain, Gap-MIA (RW) the same without the MIA term, Gap (retrain) against the plain "
             "retrain; s: seconds. MIA attack AUC (retain vs validation) of the original model: "
             "see each table's note; near 50 the MIA term is noise.\n"]
    for dname, d in results["datasets"].items():
        lines.append(f"## {dname}\n")
        lines.append(f"Forget cell: class {d['target']} ({d['cell'][0]}), group {d['sensitive']} "
                     f"({d['cell'][1]}); original model trained in {d['original']['seconds']:.1f} s.\n")
        for ratio, rows in d["ratios"].items():
            info = d["ratio_info"][ratio]
            lines.append(f"### r = {ratio} (|D_f| = {info['n_forget']}, |D_r| = {info['n_retain']})\n")
            lines.append(common.markdown_table(table_rows(rows), digits=2))
            if "mia_attack_auc" in rows.get("original", {}):
                lines.append(f"MIA attack AUC of the original model: "
                             f"{100 * rows['original']['mia_attack_auc']:.1f}.\n")
            if "soft_weights" in info:
                lines.append(f"Soft weights: {info['soft_weights']}\n")
        claims = claim_check(d["ratios"])
        if claims:
            lines.append("### The paper's claim: MIU vs L1-sparse, SalUn, SCRUB\n")
            lines.append(common.markdown_table(claims, digits=2))
            real = [c for c in claims if c["baseline"] != LABELS["original"]]
            wins = {k: sum(c[k] for c in real) for k in ("MIU lower gap", "MIU lower gap-MIA",
                                                          "MIU higher GA")}
            lines.append(f"Of {len(real)} comparisons with the six baselines, MIU has the lower "
                         f"Avg. Gap (vs RW retrain) "
                         f"in {wins['MIU lower gap']}, the lower gap without MIA in "
                         f"{wins['MIU lower gap-MIA']} and the higher group accuracy in "
                         f"{wins['MIU higher GA']}.\n")
        if d.get("ablation"):
            ab = d["ablation"]
            lines.append(f"### MIU quirk ablation (r = {ab['ratio']})\n")
            lines.append(f"Fresh MINE on the original features: I_U = {ab['fresh_mi_original']:.4f} nats "
                         "(uniform c~: I(Z;G) + KL(P_G || U)).\n")
            rows = []
            for name, v in ab["variants"].items():
                if "error" in v:
                    rows.append({"variant": name, "error": v["error"]})
                    continue
                rows.append({"variant": name, "MI_unl est.": v["mi_unlearned_estimator"],
                             "MI_unl fresh": v["fresh_mi_unlearned"],
                             "MI_orig est.": v["mi_original_estimator"],
                             "MI_orig fresh": ab["fresh_mi_original"],
                             "FA": 100 * v["forget_accuracy"], "GA": 100 * v["group_accuracy"],
                             "EO": 100 * v["eo"],
                             "Gap (RW)": 100 * v.get("avg_gap_rw_retrain", float("nan")),
                             "Gap-MIA (RW)": 100 * v.get("avg_gap_nomia_rw_retrain", float("nan")),
                             "s": v["seconds"]})
            lines.append(common.markdown_table(rows, digits=4))
    if os.path.exists(os.path.join(out, "group_accuracy.png")):
        lines.append("![group accuracy against forget ratio](group_accuracy.png)\n")
    text = "\n".join(lines)
    common.write_text(os.path.join(out, "report.md"), text)
    return text


# ----------------------------------------------------------------------------- main

def by_dataset(cells: list[dict]) -> dict:
    """The cells of results.json nested for the report: ``{dataset: {target, sensitive, cell,
    original, ratios: {str(r): rows}, ratio_info: {str(r): info}[, ablation]}}``."""
    out = {}
    for c in cells:
        d = out.setdefault(c["dataset"], {k: c[k] for k in ("target", "sensitive", "cell", "original")}
                           | {"ratios": {}, "ratio_info": {}})
        d["ratios"][str(c["ratio"])] = c["rows"]
        d["ratio_info"][str(c["ratio"])] = c["info"]
        if "ablation" in c:
            d["ablation"] = c["ablation"]
    return out


def run_dataset(spec: DatasetConfig, cfg: Config, ratios, args, *, seed: int, ablation: bool):
    """Train (or restore) the original model of ``spec`` for one seed and yield one cell per ratio
    in ``ratios`` (with the MIU quirk ablation when ``ablation`` and the config asks for it)."""
    progress = not args.no_progress
    ds = load_dataset(spec, args.data_dir)
    rows_by_ratio = forget_rows(ds, spec, ratios, seed)  # validates before training
    study = Study(spec, ds, seed=seed, progress=progress)
    if progress:
        print(f"[{spec.name}, seed {seed}] training the original model", flush=True)
    original, orig_info = study.train_original(os.path.join(args.out, "checkpoints", f"seed{seed}",
                                                            spec.name))
    head = {"seed": seed, "dataset": spec.name, "target": spec.target, "sensitive": spec.sensitive,
            "cell": [ds.class_names[spec.target], ds.group_names[spec.sensitive]],
            "original": orig_info}
    ab = cfg.ablation if ablation else None
    for r, rows in rows_by_ratio.items():
        if progress:
            print(f"[{spec.name}] r = {r}: |D_f| = {len(rows)}", flush=True)
        wants_ablation = ab is not None and ab["dataset"] == spec.name and abs(ab["ratio"] - r) < 1e-9
        t0 = time.perf_counter()
        cell = run_cell(study, original, rows, r, cfg.methods, ab if wants_ablation else None)
        yield {**head, "ratio": r, **cell, "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--data-dir", default=None,
                       help="dataset directory (CelebA/TFDS, Waterbirds, FairFace; Adult optional)")
        p.add_argument("--no-compile-cache", action="store_true",
                       help="do not use JAX's persistent compilation cache in OUT/.jax_cache")

    args, cfg, name = common.parse_args(__doc__.splitlines()[0], driver="group_robust",
                                        config_cls=Config, default_out="runs/group_robust",
                                        extra=extra, argv=argv, validate=validate)
    specs = [DatasetConfig(**d) for d in cfg.datasets]
    ratios = check_ratios(cfg.ratios)
    if not args.no_compile_cache and jax.config.jax_compilation_cache_dir is None:
        # Plain and reweighted runs of a method (and the MIU variants) compile to the same
        # programs; the persistent cache serves the repeats (about -40% CPU time on quick).
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    path = os.path.join(args.out, "results.json")
    if args.fresh:
        shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)
    # A cell depends on its (seed, dataset, ratio) only, so seeds and ratios are left out of the
    # signature: a run with more seeds or ratios resumes a smaller one.
    signature = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in ("seeds", "ratios")}, "seed": args.seed}
    cells = [] if args.fresh else common.resume_rows(path, signature)
    done = {(c.get("seed", args.seed), c["dataset"], c["ratio"]) for c in cells}
    if done and not args.no_progress:
        print(f"resuming {path}: {len(done)} finished cell(s) kept", flush=True)
    seeds = [args.seed + i for i in range(cfg.seeds)]
    for i, seed in enumerate(seeds):
        for spec in specs:
            todo = [r for r in ratios if (seed, spec.name, r) not in done]
            if todo:
                for cell in run_dataset(spec, cfg, todo, args, seed=seed, ablation=i == 0):
                    cells.append(cell)
                    common.write_json(path, {"signature": signature, "rows": cells})
    order = {key: i for i, key in enumerate((sd, s.name, r) for sd in seeds for s in specs
                                            for r in ratios)}
    mine = sorted((c for c in cells if (c.get("seed", args.seed), c["dataset"], c["ratio"]) in order),
                  key=lambda c: order[(c.get("seed", args.seed), c["dataset"], c["ratio"])])
    first = [c for c in mine if c.get("seed", args.seed) == seeds[0]]
    analysis = analyse(mine, specs, ratios, seeds)
    results = {"signature": signature, "preset": name, "seed": args.seed, "seeds": seeds,
               "paper_comparison": analysis["paper_comparison"],
               "environment": common.environment(),
               "analysis": {k: v for k, v in analysis.items() if k != "paper_comparison"},
               "rows": cells}
    common.write_json(path, results)
    for c in first:
        common.write_csv(os.path.join(args.out, f"{c['dataset']}_r{c['ratio']}.csv"),
                         [{k: v for k, v in row.items() if not isinstance(v, dict)}
                          for row in c["rows"].values()])
    view = {"preset": name, "datasets": by_dataset(first), "seeds": seeds, "analysis": analysis}
    plot_group_accuracy(view, os.path.join(args.out, "group_accuracy.png"))
    report = write_report(view, args.out)
    if not args.no_progress:
        print(report)
    return results


if __name__ == "__main__":
    main()
