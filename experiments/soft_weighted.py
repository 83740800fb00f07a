"""Hard- vs soft-weighted unlearning for fairness and robustness (Qiao et al. 2026, seed 004).

    python -m experiments.soft_weighted --config experiments/configs/soft_weighted_quick.py \
        [--set seeds=5 ...] [--out DIR] [--data-dir DIR] [--fresh]

(``--preset NAME`` loads ``experiments/configs/soft_weighted_<NAME>.py``: quick, smoke, paper,
bank, german, jigsaw, celeba-resnet18, cifar100-resnet50.)

For every dataset x model (LR; NN = the MLP, unlearned on its last layer) x task (fairness via
DP, fairness via EOP, robustness) x algorithm, over several seeds:

1. train the original model; its last layer is refit as L2-regularised logistic regression on
   the frozen features (the convex surrogate of seed 004 footnote 1; for LR the features are the
   inputs), by Newton's method to stationarity;
2. score every training sample's influence on validation utility, the DP / EOP surrogate and the
   loss on linearly perturbed (Megyeri, gamma = 1.3) validation points, with the closed-form
   last-layer engine (:mod:`jaxunlearn.influence.last_layer`);
3. soft weights: the closed form of eq. (6)-(7) (:func:`jaxunlearn.weights.soft_weights`, the
   reference's minimum-norm variant: predicted metric change -|f0|, predicted utility change 0);
   hard weights: eps = -1 on the k% most harmful samples, k swept on the validation set with the
   IF update until the target metric stops improving by more than 1 % of its original value
   (the sweep uses IF's closed form for every algorithm, so all hard runs share one k);
4. run each unlearning algorithm on the last layer with the hard and with the soft weights (the
   same code: :func:`jaxunlearn.weights.unlearning_sets` and :func:`jaxunlearn.loop.run`; Fisher takes the diagonal-Fisher Newton step
   towards the weighted retain optimum, with a backtracking step size, before its noise) and
   evaluate on the test set: accuracy, DP,
   EOP (hard predictions), adversarial loss and accuracy on Megyeri test points made once against
   the original model ("transfer", the reference's protocol) and re-made against each unlearned
   model ("rerun": a gamma > 1 linear perturbation flips every prediction of the model it is made
   against, so only its loss is informative).

Outputs in ``--out``: ``results.json`` (every run), ``runs.csv``, ``report.md`` with the paper's
Tables 1 and 2 (% improvement of soft over hard on the target metric and on utility) and the
per-algorithm metrics, and ``scatter_<dataset>.png`` (Figure 2: utility against fairness or
robustness, hard against soft, the "free lunch" region marked).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jaxunlearn import data, evaluation, loop, losses, methods, metrics, weights
from jaxunlearn.influence import last_layer, measurements, scores, solvers, update

TASKS = ("dp", "eop", "robust")
LR_ALGORITHMS = ("GA_FT", "IF", "Fisher", "SCRUB", "Bad-T")  # Table 1 (convex model)
NN_ALGORITHMS = ("GA_FT", "IF", "Fisher", "NTK", "SCRUB", "Bad-T", "CF-k", "EU-k")  # Table 2

# The reference's per-dataset L2 of the logistic surrogate (sklearn C = 1 / l2, no intercept);
# other datasets use sklearn's default C = 1.
REFERENCE_L2 = {"adult": 2.2622, "bank": 1.1622, "celeb_a": 15.1622, "civil_comments": 5.1622}


@dataclasses.dataclass(frozen=True)
class Config:
    """One preset: which grid to run and how long each piece trains."""

    datasets: tuple = ("adult",)
    models: tuple = ("lr", "nn")
    tasks: tuple = TASKS
    seeds: int = 1
    nn_hidden: tuple = (64, 32)
    nn_epochs: int = 6
    nn_lr: float = 1e-3
    unlearn_epochs: int = 5
    unlearn_lr: float = 1e-2
    batch_size: int = 512
    hard_fractions: tuple = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    sweep_tolerance: float = 0.01  # a larger hard k must improve the val metric by 1 % of its original value
    soft_variant: str = "min_norm"
    fisher_alpha: float = 1e-8  # noise scale of Fisher forgetting (reference range 1e-9 ... 1e-6)
    max_train: int | None = None  # subsample the training set (smoke runs, CPU-scale image/text)
    algorithms: tuple | None = None  # restrict the algorithms (default: Table 1 / Table 2 lists)
    image_size: int = 32
    backbone: str = "mlp"  # "mlp" or "resnet18"/"resnet50" for the image presets
    backbone_width: int = 64
    input: str = "memory"  # "stream": TFDS images read batch by batch (common.check_input)


def preset(name: str) -> Config:
    """The config of ``experiments/configs/soft_weighted_<name>.py``."""
    return common.load_config(common.config_path("soft_weighted", name), Config)


# ----------------------------------------------------------------------------- data and models


def load_dataset(name: str, *, seed: int, data_dir: str | None, cfg: Config) -> data.Dataset:
    """The dataset ``name`` (:func:`experiments.common.load_dataset`)."""
    return common.load_dataset(name, data_dir=data_dir, seed=seed, image_size=cfg.image_size,
                               max_train=cfg.max_train, input=cfg.input)


def check_task(task: str, ds: data.Dataset) -> None:
    """Refuse a task the dataset cannot support, naming the reason."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if task == "robust":
        return
    if ds.num_groups < 2:
        raise ValueError(f"task {task!r} needs a sensitive attribute, but {ds.name} has none")
    if ds.num_classes != 2:
        raise ValueError(f"task {task!r} is defined for binary targets; {ds.name} has "
                         f"{ds.num_classes} classes")
    for split in ("val", "test"):
        s = getattr(ds, split)
        for g in range(ds.num_groups):
            cell = (s["group"] == g) if task == "dp" else (s["group"] == g) & (s["y"] == 1)
            if not np.any(cell):
                what = "samples" if task == "dp" else "positive samples"
                raise ValueError(f"task {task!r}: group {ds.group_names[g]!r} has no {what} in "
                                 f"the {split} split of {ds.name}")


def features_of(model_kind: str, ds: data.Dataset, cfg: Config, *, key, progress: bool):
    """Frozen features (train, val, test) and the training time of the body.

    LR: the inputs themselves. NN: the penultimate activations of a network trained on the whole
    training set with :func:`jaxunlearn.methods.train`.
    """
    if model_kind == "lr":
        return ds.train["x"], ds.val["x"], ds.test["x"], 0.0
    net = common.build_model(cfg.backbone, ds.input_shape, ds.num_classes, hidden=cfg.nn_hidden,
                             width=cfg.backbone_width)
    tx = common.cosine_adam(cfg.nn_lr, epochs=cfg.nn_epochs, n=len(ds.train["y"]),
                            batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    variables, _ = common.train_model(net, ds.train, tx, epochs=cfg.nn_epochs, batch_size=cfg.batch_size,
                                      l2=1e-5, init_key=key, key=jax.random.fold_in(key, 1),
                                      progress=progress, desc="NN body")
    # streamed splits are read batch by batch; only the [n, F] features come back to the host
    feats = [evaluation.predict(net.apply, variables, s["x"], batch_size=cfg.batch_size,
                                mesh=common.MESH)[1] for s in (ds.train, ds.val, ds.test)]
    return (*feats, time.perf_counter() - t0)


def feature_split(split: dict, features) -> dict:
    return {"x": np.asarray(features, np.float32), "y": split["y"], "group": split["group"],
            "index": split["index"]}


# ----------------------------------------------------------------------------- evaluation


def evaluate_head(head: dict, test: dict, adv_transfer: dict, *, gamma: float = 1.3) -> dict:
    """Test metrics of a linear head on features (module docstring)."""
    variables = {"params": head}
    logits, _ = last_layer.head_apply(variables, jnp.asarray(test["x"]))
    pred = np.asarray(jnp.argmax(losses.class_logits(logits), -1))
    y, g = test["y"], test["group"]
    out = {"accuracy": float(np.mean(pred == y)),
           "loss": float(jnp.mean(losses.cross_entropy(logits, jnp.asarray(y))))}
    if len(np.unique(g)) >= 2:
        out["dp"] = float(metrics.demographic_parity(pred, g, absolute=True))
        out["eop"] = float(metrics.equal_opportunity(pred, y, g, absolute=True))
    adv_logits, _ = last_layer.head_apply(variables, jnp.asarray(adv_transfer["x"]))
    out["adv_loss"] = float(jnp.mean(losses.cross_entropy(adv_logits, jnp.asarray(y))))
    out["adv_accuracy"] = float(np.mean(np.asarray(jnp.argmax(losses.class_logits(adv_logits), -1)) == y))
    rerun = measurements.linear_adversarial_batch(test, head["kernel"], head.get("bias"), gamma=gamma)
    rerun_logits, _ = last_layer.head_apply(variables, jnp.asarray(rerun["x"]))
    out["adv_loss_rerun"] = float(jnp.mean(losses.cross_entropy(rerun_logits, jnp.asarray(y))))
    return out


TARGET = {"dp": "dp", "eop": "eop", "robust": "adv_loss"}


# ----------------------------------------------------------------------------- influence + weights


def influence_vectors(head, train_f: dict, val_f: dict, *, l2: float, gamma: float = 1.3):
    """Scores (DESIGN.md convention) of every training sample for utility, DP, EOP, robustness."""
    problem = last_layer.make_problem(head, {"x": train_f["x"], "y": train_f["y"]}, l2=l2)
    val = {k: jnp.asarray(v) for k, v in val_f.items()}
    adv_val = measurements.linear_adversarial_batch(val, head["kernel"], head.get("bias"), gamma=gamma)
    measures = {"util": (measurements.utility(last_layer.head_apply), val),
                "robust": (measurements.utility(last_layer.head_apply), adv_val)}  # the attack batch
    if len(np.unique(val_f["group"])) >= 2:  # |gap| measurements: the study lowers |DP|, |EOP|
        measures["dp"] = (measurements.demographic_parity(last_layer.head_apply, aggregate="range"), val)
        measures["eop"] = (measurements.equal_opportunity(last_layer.head_apply, aggregate="range"), val)
    res = scores.influence_scores(problem, measures, solver=solvers.Direct(), on_nonstationary="raise")
    return problem, {k: np.asarray(v) for k, v in res.scores.items()}, res.values, res.grad_norm


def hard_sweep(problem, head, metric_scores, val_f, adv_val, task, fractions, tolerance):
    """Sweep k with the IF update on the validation set; returns (fraction, eps, curve).

    A larger k must lower the validation metric by more than ``tolerance`` times the original
    model's value, so that vanishing gains do not remove half of the training set.
    """

    def evaluate(new_head):
        return evaluate_head(new_head, val_f, adv_val)[TARGET[task]]

    base_value = abs(evaluate(head))
    sweep = update.sweep_influence_update(problem, metric_scores, evaluate, fractions,
                                          solver=solvers.Direct(), min_improvement=tolerance * base_value)
    return sweep.fraction, np.asarray(sweep.weights), list(zip(sweep.fractions, sweep.values))


# ----------------------------------------------------------------------------- algorithms


def if_method(head, problem) -> methods.Method:
    """IF unlearning on the head with the exact inverse Hessian (a Cholesky factor, built once)."""
    shape, fit_intercept = problem.data["W"].shape, "bias" in head

    def inverse_hvp(v, L):
        x = jax.scipy.linalg.cho_solve((L, True), last_layer.head_to_matrix(v).reshape(-1))
        return last_layer.matrix_to_head(x.reshape(shape), fit_intercept=fit_intercept)

    chol = jnp.linalg.cholesky(problem.hessian(problem.data))
    return methods.influence_unlearning(last_layer.head_apply, inverse_hvp,
                                        num_train=int(problem.normalizer), operands=chol)


def build_methods(names, *, head, problem, cfg: Config, key) -> dict:
    """The weight-independent algorithms on the last layer, compiled once per cell.

    Each is a :class:`~jaxunlearn.loop.Program` (:func:`jaxunlearn.loop.compile`), reused across
    tasks and schemes without recompiling. Fisher depends on the retain weights (its diagonal
    Fisher is weighted), so it is built per run by :func:`run_algorithm`.
    """
    apply_fn = last_layer.head_apply
    opt, slow = optax.adam(cfg.unlearn_lr), optax.adam(cfg.unlearn_lr / 10)
    everything = jax.tree.map(lambda _: True, head)
    teacher = jax.tree.map(lambda p: 0.1 * jax.random.normal(key, p.shape, p.dtype), head)
    factories = {
        "GA_FT": lambda: methods.neggrad_plus(apply_fn, alpha=0.95, weight_decay=1e-3, optimizer=opt),
        "IF": lambda: if_method(head, problem),
        "NTK": lambda: methods.ntk_forgetting(apply_fn, weight_decay=0.1),
        "SCRUB": lambda: methods.scrub(apply_fn, optimizer=slow),
        "Bad-T": lambda: methods.bad_teacher(apply_fn, {"params": teacher}, optimizer=slow),
        "CF-k": lambda: methods.cf_k(apply_fn, everything, optimizer=opt),
        "EU-k": lambda: methods.eu_k(apply_fn, {"params": jax.tree.map(jnp.zeros_like, head)},
                                     everything, optimizer=opt),
    }
    unknown = [n for n in names if n not in factories and n != "Fisher"]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {sorted(factories)} or Fisher")
    return {n: loop.compile(factories[n](), mesh=common.MESH) for n in names if n != "Fisher"}


def run_algorithm(name, built: dict, *, head, train_f, eps, cfg, key, progress, l2: float):
    """Run algorithm ``name`` with weights ``eps``; returns (new head, seconds)."""
    sets = weights.unlearning_sets(train_f, eps)
    retain = sets["retain"]
    t0 = time.perf_counter()
    if name == "Fisher":  # the diagonal Newton step on the weighted retain objective, then noise
        v = {"params": head}
        # soft weights 1 + eps can be negative (ascent); the curvature keeps only the non-negative
        # part so that diag(F) + l2 stays positive, as a Gauss-Newton approximation does
        curvature = {**retain, "weight": np.maximum(retain["weight"], 0.0)}
        fisher = methods.fisher_diagonal(last_layer.head_apply, v, curvature, batch_size=1024)
        grad = methods.retain_gradient(last_layer.head_apply, v, retain, l2=l2, batch_size=4096)
        eta = methods.newton_step_size(last_layer.head_apply, v, retain, fisher, grad, l2=l2,
                                       damping=l2, batch_size=4096)
        method = methods.fisher_forgetting(fisher, alpha=cfg.fisher_alpha, newton_grad=grad,
                                           damping=l2, step_size=eta)
    else:
        method = built[name]
    uses = (method.method if isinstance(method, loop.Program) else method).uses
    sizes = None
    if "forget" in uses and "retain" in uses:  # mix the two sets in proportion
        n_f = int(np.count_nonzero(sets["forget"]["weight"]))
        n_r = int(np.count_nonzero(retain["weight"]))
        sizes = {"forget": max(1, round(cfg.batch_size * n_f / max(n_r, 1)))}
    variables, _, _ = loop.run(method, {"params": head}, sets, epochs=cfg.unlearn_epochs,
                               batch_size=cfg.batch_size, batch_sizes=sizes, key=key,
                               mesh=common.MESH, progress=progress)
    jax.block_until_ready(variables)
    return variables["params"], time.perf_counter() - t0


# ----------------------------------------------------------------------------- the study


def run_cell(ds, model_kind, cfg: Config, *, seed: int, progress: bool) -> list[dict]:
    """Every task x algorithm x scheme for one dataset, model and seed."""
    key = jax.random.key(seed)
    timings = {}
    with common.timer(timings, "features"):
        ftr, fva, fte, _ = features_of(model_kind, ds, cfg, key=jax.random.fold_in(key, 0),
                                        progress=progress)
    train_f, val_f, test_f = (feature_split(s, f) for s, f in
                              ((ds.train, ftr), (ds.val, fva), (ds.test, fte)))
    n = len(train_f["y"])
    l2 = last_layer.l2_from_sklearn(1.0 / REFERENCE_L2.get(ds.name, 1.0), n)
    k_out = 1 if ds.num_classes == 2 else ds.num_classes
    with common.timer(timings, "refit_head"):
        head, info = last_layer.refit_head(jnp.asarray(train_f["x"]), jnp.asarray(train_f["y"]),
                                           l2=l2, num_outputs=k_out, fit_intercept=True)
    if not bool(info.converged):
        raise FloatingPointError(f"the head refit did not reach stationarity (|grad| = {float(info.grad_norm):.2e})")
    with common.timer(timings, "influence"):
        problem, svec, values, grad_norm = influence_vectors(head, train_f, val_f, l2=l2)
    adv_test = measurements.linear_adversarial_batch(test_f, head["kernel"], head.get("bias"))
    adv_val = measurements.linear_adversarial_batch(val_f, head["kernel"], head.get("bias"))
    original = evaluate_head(head, test_f, adv_test)
    algos = LR_ALGORITHMS if model_kind == "lr" else NN_ALGORITHMS
    if cfg.algorithms is not None:
        algos = tuple(a for a in algos if a in cfg.algorithms)
    built = build_methods(algos, head=head, problem=problem, cfg=cfg, key=jax.random.fold_in(key, 3))
    rows = [{"dataset": ds.name, "model": model_kind, "seed": seed, "task": "-", "algorithm": "original",
             "scheme": "original", **original, "seconds": timings["refit_head"]}]
    for task in cfg.tasks:
        check_task(task, ds)
        t0 = time.perf_counter()
        eps_soft, winfo = weights.soft_weights(svec[task], svec["util"], delta=abs(float(values[task])),
                                               variant=cfg.soft_variant)
        eps_soft = np.asarray(eps_soft)
        t_soft = time.perf_counter() - t0
        t0 = time.perf_counter()
        frac, eps_hard, curve = hard_sweep(problem, head, svec[task], val_f, adv_val, task,
                                           cfg.hard_fractions, cfg.sweep_tolerance)
        t_hard = time.perf_counter() - t0
        meta = {"dataset": ds.name, "model": model_kind, "seed": seed, "task": task}
        for scheme, eps, t_w in (("hard", eps_hard, t_hard), ("soft", eps_soft, t_soft)):
            for algo in algos:
                new_head, secs = run_algorithm(algo, built, head=head, train_f=train_f, eps=eps,
                                               cfg=cfg, key=jax.random.fold_in(key, 7), progress=False,
                                               l2=l2)
                row = {**meta, "algorithm": algo, "scheme": scheme,
                       **evaluate_head(new_head, test_f, adv_test),
                       "seconds": secs, "weights_seconds": t_w,
                       "hard_fraction": frac if scheme == "hard" else None,
                       "soft_case": int(winfo["case"]) if scheme == "soft" else None,
                       "predicted_metric_change": float(-np.dot(eps, svec[task])),
                       "predicted_utility_change": float(-np.dot(eps, svec["util"]))}
                rows.append(row)
                if progress:
                    print(f"  {ds.name}/{model_kind}/{task}/{algo:6s} {scheme}: "
                          f"acc {row['accuracy']:.4f}  {TARGET[task]} {row[TARGET[task]]:.4f}", flush=True)
        rows.append({**meta, "algorithm": "-", "scheme": "sweep", "hard_fraction": frac,
                     "sweep_curve": curve, "influence_seconds": timings["influence"],
                     "grad_norm": grad_norm, "original_val_metric": float(values[task])})
    return rows


def improvement_tables(rows: list[dict]) -> list[dict]:
    """% improvement of soft over hard, per dataset x model x task x algorithm (seed means)."""
    out = []
    keys = sorted({(r["dataset"], r["model"], r["task"], r["algorithm"]) for r in rows
                   if r["scheme"] in ("hard", "soft")})
    for ds, model, task, algo in keys:
        sel = {s: [r for r in rows if (r["dataset"], r["model"], r["task"], r["algorithm"], r["scheme"])
                   == (ds, model, task, algo, s)] for s in ("hard", "soft")}
        tgt = TARGET[task]
        m = {s: float(np.mean([r[tgt] for r in sel[s]])) for s in sel}
        a = {s: float(np.mean([r["accuracy"] for r in sel[s]])) for s in sel}
        paired = {r["seed"]: r[tgt] for r in sel["hard"]}
        wins = sum(r[tgt] < paired[r["seed"]] for r in sel["soft"] if r["seed"] in paired)
        out.append({"dataset": ds, "model": model, "task": task, "algorithm": algo,
                    f"hard_target": m["hard"], "soft_target": m["soft"],
                    "target_improvement_%": 100 * (m["hard"] - m["soft"]) / max(abs(m["hard"]), 1e-12),
                    "hard_accuracy": a["hard"], "soft_accuracy": a["soft"],
                    "utility_improvement_%": 100 * (a["soft"] - a["hard"]) / a["hard"],
                    "soft_wins": f"{wins}/{len(sel['soft'])}", "seeds": len(sel["soft"])})
        if task == "robust":  # the attack re-made against each unlearned model
            rr = {s: float(np.mean([r["adv_loss_rerun"] for r in sel[s]])) for s in sel}
            out[-1].update({"hard_rerun": rr["hard"], "soft_rerun": rr["soft"],
                            "rerun_improvement_%": 100 * (rr["hard"] - rr["soft"]) / max(abs(rr["hard"]), 1e-12)})
    return out


def paper_table(imp: list[dict], model: str) -> str:
    """The layout of seed 004 Tables 1/2: rows = algorithms, columns = dataset x (Fair., Robust.)."""
    rows = {}
    for r in imp:
        if r["model"] != model:
            continue
        row = rows.setdefault(r["algorithm"], {"method": r["algorithm"]})
        label = {"dp": "Fair.(DP)", "eop": "Fair.(EOP)", "robust": "Robust."}[r["task"]]
        row[f"{r['dataset']} {label}"] = r["target_improvement_%"]
        row[f"{r['dataset']} {label} utility"] = r["utility_improvement_%"]
        if "rerun_improvement_%" in r:
            row[f"{r['dataset']} Robust.(rerun)"] = r["rerun_improvement_%"]
    return common.markdown_table(list(rows.values()), digits=1)


def scatter(rows: list[dict], ds_name: str, path: str) -> None:
    """Figure 2: utility vs target metric, hard (o) vs soft (x), free-lunch region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = sorted({r["model"] for r in rows if r["dataset"] == ds_name})
    tasks = [t for t in TASKS if any(r["task"] == t and r["dataset"] == ds_name for r in rows)]
    fig, axes = plt.subplots(len(models_), len(tasks), figsize=(4.2 * len(tasks), 3.6 * len(models_)),
                             squeeze=False)
    algos = sorted({r["algorithm"] for r in rows if r["scheme"] in ("hard", "soft")})
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(algos)}
    for i, model in enumerate(models_):
        orig = [r for r in rows if r["dataset"] == ds_name and r["model"] == model and r["scheme"] == "original"]
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            tgt = TARGET[task]
            x0, y0 = np.mean([r[tgt] for r in orig]), np.mean([r["accuracy"] for r in orig])
            for algo in algos:
                for scheme, marker in (("hard", "o"), ("soft", "x")):
                    sel = [r for r in rows if (r["dataset"], r["model"], r["task"], r["algorithm"], r["scheme"])
                           == (ds_name, model, task, algo, scheme)]
                    if sel:
                        ax.scatter(np.mean([r[tgt] for r in sel]), np.mean([r["accuracy"] for r in sel]),
                                   marker=marker, color=colors[algo], s=45)
            ax.scatter([x0], [y0], marker="*", color="k", s=120)
            xl, yl = ax.get_xlim(), ax.get_ylim()
            ax.fill_between([min(xl[0], x0), x0], y0, max(yl[1], y0), color="green", alpha=0.12)
            ax.set_xlim(xl)
            ax.set_ylim(yl)
            ax.set_xlabel({"dp": "|DP| (test)", "eop": "|EOP| (test)", "robust": "adversarial loss (test)"}[task])
            ax.set_ylabel(f"{model.upper()} test accuracy")
            ax.set_title(f"{ds_name} / {model.upper()} / {task}")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[a], marker="s", ls="", label=a) for a in algos]
    handles += [Line2D([], [], color="k", marker="o", ls="", mfc="none", label="hard"),
                Line2D([], [], color="k", marker="x", ls="", label="soft"),
                Line2D([], [], color="k", marker="*", ls="", ms=10, label="original")]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle("Hard (o) vs soft (x) weights; green: free lunch (better target metric and utility)")
    fig.tight_layout(rect=(0, 0, 0.88, 0.96))
    common.savefig(fig, path)


def report(rows, imp, cfg_name, cfg, timings) -> str:
    parts = [f"# Soft- vs hard-weighted unlearning ({cfg_name} preset)\n",
             f"Datasets {', '.join(cfg.datasets)}; models {', '.join(cfg.models)}; tasks "
             f"{', '.join(cfg.tasks)}; {cfg.seeds} seed(s); {cfg.unlearn_epochs} unlearning epochs. "
             "Target metrics on the test set: |DP| and |EOP| with hard predictions, adversarial loss "
             "on Megyeri points made against the original model (transfer, the reference's "
             "protocol); Robust.(rerun) re-makes the points against each unlearned model. "
             "Improvement = "
             "(hard - soft) / hard for the target metric, (soft - hard) / hard for accuracy, in %, "
             "on seed means.\n"]
    for model, title in (("lr", "Table 1: convex model (LR)"), ("nn", "Table 2: non-convex model (NN, last layer)")):
        if any(r["model"] == model for r in imp):
            parts.append(f"## {title}: % improvement of soft over hard\n\n" + paper_table(imp, model))
    target = sum(r["target_improvement_%"] > 0 for r in imp)
    utility = sum(r["utility_improvement_%"] > 0 for r in imp)
    both = sum(r["target_improvement_%"] > 0 and r["utility_improvement_%"] > 0 for r in imp)
    parts.append(f"Soft beats hard on the target metric in {target} of {len(imp)} cells, on accuracy "
                 f"in {utility}, on both in {both} (seed means; `soft_wins`: seeds where soft's "
                 "target metric is lower).\n")
    parts.append("## Every algorithm (seed means)\n\n" + common.markdown_table(
        imp, ["dataset", "model", "task", "algorithm", "hard_target", "soft_target",
              "target_improvement_%", "soft_wins", "hard_accuracy", "soft_accuracy",
              "utility_improvement_%"]))
    orig = [r for r in rows if r["scheme"] == "original"]
    parts.append("## Original models (per seed)\n\n" + common.markdown_table(
        orig, ["dataset", "model", "seed", "accuracy", "dp", "eop", "adv_loss", "adv_accuracy"]))
    sweeps = [r for r in rows if r["scheme"] == "sweep"]
    parts.append("## Hard-weight sweep (chosen k per task)\n\n" + common.markdown_table(
        sweeps, ["dataset", "model", "seed", "task", "hard_fraction", "original_val_metric", "grad_norm"]))
    parts.append("## Wall time (seconds)\n\n" + common.markdown_table([timings]))
    return "\n".join(parts)


def run_study(cfg: Config, *, out: str, preset: str = "custom", data_dir: str | None = None,
              seed: int = 0, progress: bool = True, fresh: bool = False) -> dict:
    """Run the grid of ``cfg`` and write every output to ``out`` (module docstring).

    ``results.json`` is rewritten atomically after each dataset x model x seed cell; a rerun
    with the same settings skips the finished cells (``fresh=True`` starts over).

    Returns:
      The results dict that is also written to ``out/results.json``.
    """
    path = os.path.join(out, "results.json")
    signature = {"preset": preset, "config": dataclasses.asdict(cfg), "seed": seed}
    rows = [] if fresh else common.resume_rows(path, signature)
    done = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    timings = {}
    if done:
        print(f"resuming {path}: {len(done)} finished cell(s) kept", flush=True)
        with open(path) as f:  # the wall time of the finished cells counts too
            timings = {k: float(v) for k, v in json.load(f).get("timings", {}).items()}
    t_all = time.perf_counter() - timings.pop("total", 0.0)
    for ds_name in cfg.datasets:
        for s in range(cfg.seeds):
            cell_seed = seed + s
            todo = [m for m in cfg.models if (ds_name, m, cell_seed) not in done]
            if not todo:
                continue
            with common.timer(timings, "data"):
                ds = load_dataset(ds_name, seed=cell_seed, data_dir=data_dir, cfg=cfg)
            for task in cfg.tasks:
                check_task(task, ds)
            for model_kind in todo:
                print(f"[{ds_name} / {model_kind} / seed {cell_seed}]", flush=True)
                with common.timer(timings, f"{model_kind}"):
                    rows.extend(run_cell(ds, model_kind, cfg, seed=cell_seed, progress=progress))
                common.write_json(path, {"signature": signature, "rows": rows, "complete": False,
                                         "timings": {**timings, "total": time.perf_counter() - t_all}})
    timings["total"] = time.perf_counter() - t_all
    imp = improvement_tables(rows)
    results = {"signature": signature, "preset": preset, "config": dataclasses.asdict(cfg),
               "environment": common.environment(), "timings": timings, "improvement": imp,
               "rows": rows, "complete": True}
    common.write_json(path, results)
    common.write_csv(os.path.join(out, "runs.csv"),
                     [{k: v for k, v in r.items() if k != "sweep_curve"} for r in rows])
    text = report(rows, imp, preset, cfg, timings)
    common.write_text(os.path.join(out, "report.md"), text)
    for ds_name in cfg.datasets:
        scatter(rows, ds_name, os.path.join(out, f"scatter_{ds_name}.png"))
    print(text)
    return results


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--data-dir", default=None, help="directory of a non-embedded dataset")
        p.add_argument("--seeds", type=int, default=None, help="short for --set seeds=N")

    args, cfg, name = common.parse_args(__doc__.splitlines()[0], driver="soft_weighted",
                                        config_cls=Config, default_out="runs/soft_weighted",
                                        extra=extra, argv=argv)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    return run_study(cfg, out=args.out, preset=name, data_dir=args.data_dir, seed=args.seed,
                     progress=not args.no_progress, fresh=args.fresh)


if __name__ == "__main__":
    main()
