"""Train the original models every study starts from, and report their accuracy.

LR and the MLP ("NN") on Adult; a CPU-scale ResNet-18 and SmallViT on scikit-learn's digits (or,
with the paper config, the paper-scale widths). Everything runs offline.

    python -m experiments.train_baselines --config experiments/configs/train_baselines_quick.py \\
        [--set models=adult_lr,adult_mlp] [--out DIR] [--fresh]

Writes ``DIR/results.json`` (rewritten after each model; a rerun skips the finished ones),
``DIR/report.md`` and ``DIR/baselines.png`` (train/val/test accuracy per model, training loss per
epoch), with resumable Orbax checkpoints under ``DIR/checkpoints/<model>``: an
interrupted training picks up from the last finished epoch.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import numpy as np

from experiments import common
from jaxunlearn import checkpoint, evaluation


@dataclasses.dataclass(frozen=True)
class Config:
    """``recipes``: name -> dict(dataset, model, lr, epochs, batch_size, l2, model kwargs);
    ``models``: the names to train (default: all)."""

    recipes: dict = dataclasses.field(default_factory=dict)
    models: tuple | None = None


RECIPE_KEYS = ("dataset", "model", "lr", "epochs", "batch_size", "l2")


def validate(cfg: Config) -> None:
    """Refuse a config before any compute (:func:`experiments.common.check_config`)."""
    if not cfg.recipes:
        raise ValueError("config recipes is empty: the config names no model")
    unknown = [m for m in (cfg.models or ()) if m not in cfg.recipes]
    if unknown or (cfg.models is not None and not cfg.models):
        raise ValueError(f"config models: unknown {unknown or 'empty'}; known: {sorted(cfg.recipes)}")
    for name, r in cfg.recipes.items():
        missing = [k for k in RECIPE_KEYS if k not in r]
        if missing:
            raise ValueError(f"config recipes[{name!r}] lacks {missing}")
        for k in ("epochs", "batch_size"):
            common.check_number(f"recipes[{name!r}][{k!r}]", r[k], low=1, integer=True)
        common.check_number(f"recipes[{name!r}]['lr']", r["lr"], low=0, low_open=True)
        common.check_number(f"recipes[{name!r}]['l2']", r["l2"], low=0)


def train_one(name: str, recipe: dict, ds, out: str, seed: int, progress: bool) -> dict:
    """Train one baseline (resuming from its checkpoints) and evaluate it."""
    r = dict(recipe)
    model = common.build_model(r.pop("model"), ds.train["x"].shape[1:], ds.num_classes,
                               **{k: v for k, v in r.items()
                                  if k not in ("dataset", "lr", "epochs", "batch_size", "l2")})
    tx = common.cosine_adam(r["lr"], epochs=r["epochs"], n=len(ds.train["y"]), batch_size=r["batch_size"])
    key = jax.random.key(seed)
    ck = checkpoint.Checkpointer(os.path.join(out, "checkpoints", name))
    t0 = time.perf_counter()
    variables, history = common.train_model(model, ds.train, tx, epochs=r["epochs"],
                                            batch_size=r["batch_size"], l2=r["l2"],
                                            init_key=jax.random.fold_in(key, 0),
                                            key=jax.random.fold_in(key, 1), checkpoints=ck,
                                            progress=progress, desc=name)
    # the epochs' own times, so that a resumed training reports the time of all its epochs
    seconds = sum(h["seconds"] for h in history) if history else time.perf_counter() - t0
    ck.close()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    row = {"model": name, "dataset": ds.name, "params": n_params, "epochs": r["epochs"],
           "train_seconds": seconds}
    for split in ("train", "val", "test"):
        ev = evaluation.evaluate(model.apply, variables, getattr(ds, split))
        row[f"{split}_accuracy"] = ev["accuracy"]
        row[f"{split}_loss"] = ev["loss"]
    row["history"] = history
    return row


def plot(rows: list[dict], path: str) -> None:
    """Accuracy per model (train / val / test bars) and each model's training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    xs = np.arange(len(rows))
    for j, split in enumerate(("train", "val", "test")):
        acc = [r[f"{split}_accuracy"] for r in rows]
        bars = ax1.bar(xs + (j - 1) * 0.27, acc, 0.27, label=split)
        if split == "test":
            ax1.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax1.set_xticks(xs, [f"{r['model']}\n({r['dataset']})" for r in rows], fontsize=8)
    ax1.set_ylim(min(0.5, min(r["test_accuracy"] for r in rows) - 0.05), 1.08)
    ax1.set_ylabel("accuracy")
    ax1.set_title("Baseline accuracy (test values labelled)")
    ax1.legend(fontsize=8, loc="upper left", ncol=3)
    for r in rows:
        loss = [h["loss"] for h in r["history"] if "loss" in h]
        ax2.plot(np.arange(1, len(loss) + 1), loss, marker="o", ms=3, label=r["model"])
    ax2.set_yscale("log")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss (epoch mean)")
    ax2.set_title("Training curves")
    ax2.legend(fontsize=8)
    common.savefig(fig, path)


def main(argv=None) -> dict:
    args, cfg, name = common.parse_args(__doc__.splitlines()[0], driver="train_baselines",
                                        config_cls=Config, default_out="runs/train_baselines",
                                        argv=argv, validate=validate)
    path = os.path.join(args.out, "results.json")
    if args.fresh:
        shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)
    signature = {"config": dataclasses.asdict(cfg), "seed": args.seed}
    rows = [] if args.fresh else common.resume_rows(path, signature)
    done = {r["model"] for r in rows}
    datasets = {}
    for model_name in cfg.models or tuple(cfg.recipes):
        if model_name not in cfg.recipes:
            raise ValueError(f"models: {model_name!r} has no recipe; known: {sorted(cfg.recipes)}")
        if model_name in done:
            continue
        recipe = cfg.recipes[model_name]
        if recipe["dataset"] not in datasets:
            datasets[recipe["dataset"]] = common.load_dataset(recipe["dataset"])
        row = train_one(model_name, recipe, datasets[recipe["dataset"]], args.out, args.seed,
                        not args.no_progress)
        print(f"{model_name:18s} test accuracy {row['test_accuracy']:.4f}  "
              f"({row['train_seconds']:.1f} s, {row['params']} parameters)", flush=True)
        rows.append(row)
        common.write_json(path, {"signature": signature, "rows": rows})
    results = {"signature": signature, "preset": name, "seed": args.seed,
               "environment": common.environment(), "rows": rows}
    common.write_json(path, results)
    cols = ["model", "dataset", "params", "epochs", "train_accuracy", "val_accuracy",
            "test_accuracy", "train_seconds"]
    plot(rows, os.path.join(args.out, "baselines.png"))
    report = (f"# Baseline models ({name} config)\n\n" + common.markdown_table(rows, cols)
              + "\n\n![accuracy and training curves](baselines.png)\n")
    common.write_text(os.path.join(args.out, "report.md"), report)
    print(report)
    return results


if __name__ == "__main__":
    main()
