"""Influence vs actual leave-one-out change on Adult (seed 004, Figure 3).

    python -m experiments.influence_validity --config experiments/configs/influence_validity_quick.py \
        [--set num_points=150 ...] [--out DIR] [--seed S] [--fresh]

For logistic regression (LR) and for the last layer of the NN (two hidden ReLU layers and a
linear head, trained with :func:`jaxunlearn.methods.train`; its head refit on the frozen features), with
the reference's convex surrogate (L2 logistic regression, sklearn ``C = 1 / 2.2622``, i.e.
``l2 = 2.2622 / n`` on the mean loss, no intercept; Newton's method to ``||grad|| < 1e-12`` in
float64):

1. predicted change of three test-set measurements when a training sample is removed, for every
   sample: utility (test loss), fairness (the DP surrogate, ``|mean_{s=1} p - mean_{s=0} p|``) and
   robustness (loss on Megyeri-perturbed test points, gamma = 1.3, made once against the model);
2. actual change: retrain without the sample (Newton, warm start, the same objective with the
   sample's weight 0) for points spread over the range of the scores (the reference's choice,
   which puts the extremes in and so inflates correlations), and for a uniformly random sample of
   ``random_points`` rows (``0`` skips it) that shows the correlation on typical samples;
3. Pearson and Spearman correlations of both samples, scatter plots (spread sample).

Outputs in ``--out``: ``results.json`` (correlations, every predicted/actual pair, timings),
``report.md`` (the table), ``figure3.png`` (the 2 x 3 grid of the paper) and one
``scatter_<model>_<measurement>.png`` per panel. ``results.json`` is rewritten after each model;
a rerun with the same config skips the finished ones.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jaxunlearn import evaluation
from jaxunlearn.data.tabular import load_adult
from jaxunlearn.influence import last_layer, measurements, validation

REFERENCE_L2 = 2.2622  # Adult, sklearn C = 1 / l2 (REFERENCE.md)
MEASURES = ("utility", "fairness", "robustness")
LABELS = {"utility": "utility (test loss)", "fairness": "fairness (DP loss on test)",
          "robustness": "robustness (loss on adversarial test points)"}


@dataclasses.dataclass(frozen=True)
class Config:
    num_points: int = 40  # leave-one-out retrainings per model, spread over the scores' range
    random_points: int = 40  # and this many more on uniformly random rows (0: none)
    nn_hidden: tuple = (64, 32)
    nn_epochs: int = 5
    nn_lr: float = 1e-3
    nn_l2: float = 1e-5
    batch_size: int = 256
    gamma: float = 1.3


def validate(cfg: Config) -> None:
    """Refuse a config before any compute (:func:`experiments.common.check_config`)."""
    for f in ("num_points", "nn_epochs", "batch_size"):
        common.check_number(f, getattr(cfg, f), low=1, integer=True)
    for i, h in enumerate(cfg.nn_hidden):
        common.check_number(f"nn_hidden[{i}]", h, low=1, integer=True)
    common.check_number("nn_lr", cfg.nn_lr, low=0, low_open=True)
    common.check_number("nn_l2", cfg.nn_l2, low=0)
    common.check_number("gamma", cfg.gamma, low=0, low_open=True)


def _nn_features(ds, cfg: Config, key, progress: bool):
    """Train the NN on Adult; return its penultimate features for train and test."""
    net = common.build_model("mlp", ds.train["x"].shape[1:], 2, hidden=cfg.nn_hidden)
    variables, history = common.train_model(net, ds.train, optax.adam(cfg.nn_lr), epochs=cfg.nn_epochs,
                                            batch_size=cfg.batch_size, l2=cfg.nn_l2, init_key=key,
                                            key=jax.random.fold_in(key, 1), progress=progress, desc="NN")
    acc = evaluation.evaluate(net.apply, variables, ds.test)["accuracy"]
    feats = [evaluation.predict(net.apply, variables, s["x"])[1] for s in (ds.train, ds.test)]
    return feats[0], feats[1], {"nn_test_accuracy": acc, "nn_final_loss": history[-1]["loss"]}


def run_model(name: str, x_train, y_train, test: dict, cfg: Config, progress: bool, *, seed: int = 0) -> dict:
    """Influence vs leave-one-out for one model's convex surrogate (float64)."""
    t = {}
    with jax.enable_x64(True):
        x = jnp.asarray(x_train, jnp.float64)
        y = jnp.asarray(y_train)
        n = x.shape[0]
        l2 = REFERENCE_L2 / n
        with common.timer(t, "refit_head"):
            head, info = last_layer.refit_head(x, y, l2=l2, fit_intercept=False)
            jax.block_until_ready(head)
        if not bool(info.converged):
            raise RuntimeError(f"{name}: the surrogate did not converge (||grad|| = {float(info.grad_norm):.3g})")
        tb = {"x": jnp.asarray(test["x"], jnp.float64), "y": jnp.asarray(test["y"]),
              "group": jnp.asarray(test["group"])}
        adv = measurements.linear_adversarial_batch(tb, head["kernel"], gamma=cfg.gamma)
        measures = {
            "utility": (measurements.utility(last_layer.head_apply), tb),
            "fairness": (measurements.demographic_parity(last_layer.head_apply, aggregate="range"), tb),
            "robustness": (measurements.utility(last_layer.head_apply), adv),  # on the attack batch
        }
        with common.timer(t, "scores_and_loo"):
            res, infl = validation.validate_last_layer(head, {"x": x, "y": y}, measures, l2=l2,
                                                       num_points=cfg.num_points, progress=progress)
            rand = None
            if cfg.random_points:
                rows = np.sort(np.random.default_rng(seed).choice(n, cfg.random_points, replace=False))
                rand, _ = validation.validate_last_layer(head, {"x": x, "y": y}, measures, l2=l2,
                                                         indices=rows, progress=progress)
    logits = np.asarray(test["x"], np.float64) @ np.asarray(head["kernel"], np.float64)
    acc = float(np.mean((logits[:, 0] > 0) == np.asarray(test["y"])))
    return {
        "model": name, "n_train": int(n), "num_features": int(x.shape[1]), "l2": l2,
        "surrogate_grad_norm": float(info.grad_norm), "surrogate_test_accuracy": acc,
        "loo_max_grad_norm": res.max_grad_norm, "values": infl.values,
        "pearson": res.pearson, "spearman": res.spearman, "indices": res.indices.tolist(),
        "predicted": {k: v.tolist() for k, v in res.predicted.items()},
        "actual": {k: v.tolist() for k, v in res.actual.items()}, "seconds": t,
        "random": None if rand is None else {
            "pearson": rand.pearson, "spearman": rand.spearman, "indices": rand.indices.tolist(),
            "predicted": {k: v.tolist() for k, v in rand.predicted.items()},
            "actual": {k: v.tolist() for k, v in rand.actual.items()}},
    }


def plot(results: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel(ax, r, k):
        p, a = np.asarray(r["predicted"][k]), np.asarray(r["actual"][k])
        lo, hi = min(p.min(), a.min()), max(p.max(), a.max())
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        ax.scatter(p, a, s=12, alpha=0.8)
        ax.set_xlabel("predicted change (influence)")
        ax.set_ylabel("actual change (leave-one-out)")
        ax.set_title(f"{r['model']}: {LABELS[k]}\nPearson {r['pearson'][k]:.3f}, "
                     f"Spearman {r['spearman'][k]:.3f}", fontsize=9)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))

    fig, axes = plt.subplots(len(results), len(MEASURES), figsize=(4.2 * len(MEASURES), 3.8 * len(results)),
                             squeeze=False)
    for i, r in enumerate(results):
        for j, k in enumerate(MEASURES):
            panel(axes[i, j], r, k)
    fig.tight_layout()
    common.savefig(fig, os.path.join(out, "figure3.png"))
    for r in results:
        for k in MEASURES:
            fig, ax = plt.subplots(figsize=(4.5, 4))
            panel(ax, r, k)
            fig.tight_layout()
            common.savefig(fig, os.path.join(out, f"scatter_{r['model']}_{k}.png"))


def report(results: list[dict], extra: dict, cfg: Config, preset: str) -> str:
    rows = []
    for r in results:
        for k in MEASURES:
            rows.append({"model": r["model"], "measurement": LABELS[k], "sample": "spread",
                         "pearson": r["pearson"][k], "spearman": r["spearman"][k],
                         "points": len(r["indices"])})
            if r.get("random"):
                rows.append({"model": r["model"], "measurement": LABELS[k], "sample": "random",
                             "pearson": r["random"]["pearson"][k], "spearman": r["random"]["spearman"][k],
                             "points": len(r["random"]["indices"])})
    text = [
        "# Influence vs leave-one-out on Adult (seed 004, Figure 3)",
        "",
        f"Preset `{preset}`. Surrogate: L2 logistic regression (sklearn C = 1/{REFERENCE_L2}, i.e. "
        "l2 = 2.2622 / n on the mean loss, no intercept), fitted by Newton's method in float64. "
        "Removed points: `spread` = evenly spaced ranks of each measurement's scores (both extremes "
        "included; the reference's choice, which inflates correlations), `random` = uniformly random "
        "training rows; each retrained by Newton from the original optimum with that sample's weight 0.",
        "",
        common.markdown_table(rows, digits=4),
        "| model | n | features | surrogate test acc. | ||grad L|| (fit) | max ||grad L|| (LOO refits) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        text.append(f"| {r['model']} | {r['n_train']} | {r['num_features']} | "
                    f"{r['surrogate_test_accuracy']:.4f} | {r['surrogate_grad_norm']:.2e} | "
                    f"{r['loo_max_grad_norm']:.2e} |")
    if "nn_test_accuracy" in extra:
        text += ["", f"NN (hidden {cfg.nn_hidden}, {cfg.nn_epochs} epochs of Adam): test accuracy "
                     f"{extra['nn_test_accuracy']:.4f}; its head is refit on the frozen features."]
    text += ["", "![figure 3](figure3.png)", ""]
    return "\n".join(text)


def main(argv=None) -> dict:
    args, cfg, name = common.parse_args(__doc__.splitlines()[0], driver="influence_validity",
                                        config_cls=Config, default_out="results/influence_validity",
                                        argv=argv, validate=validate)
    progress = not args.no_progress
    key = jax.random.key(args.seed)
    path = os.path.join(args.out, "results.json")
    signature = {"config": dataclasses.asdict(cfg), "seed": args.seed}
    results = [] if args.fresh else common.resume_rows(path, signature)  # one row per model
    t0 = time.perf_counter()
    ds = load_adult(seed=args.seed)
    if not any(r["model"] == "LR" for r in results):
        results.append(run_model("LR", ds.train["x"], ds.train["y"], ds.test, cfg, progress, seed=args.seed))
        common.write_json(path, {"signature": signature, "rows": results})
    if not any(r["model"] == "NN" for r in results):
        ftr, fte, nn = _nn_features(ds, cfg, key, progress)
        test_f = {"x": fte, "y": ds.test["y"], "group": ds.test["group"]}
        results.append({**run_model("NN", ftr, ds.train["y"], test_f, cfg, progress, seed=args.seed), **nn})
    extra = {k: v for k, v in results[-1].items() if k.startswith("nn_")}
    summary = {"signature": signature, "preset": name, "config": dataclasses.asdict(cfg),
               "seed": args.seed, "environment": common.environment(),
               "seconds": time.perf_counter() - t0, **extra, "rows": results}
    common.write_json(path, summary)
    plot(results, args.out)
    common.write_text(os.path.join(args.out, "report.md"), report(results, extra, cfg, name))
    for r in results:
        print(r["model"], {k: (round(r["pearson"][k], 4), round(r["spearman"][k], 4)) for k in MEASURES})
        if r.get("random"):
            print(r["model"], "random", {k: (round(r["random"]["pearson"][k], 4),
                                             round(r["random"]["spearman"][k], 4)) for k in MEASURES})
    return summary


if __name__ == "__main__":
    main()
