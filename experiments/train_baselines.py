"""Train the original models every study starts from, and report their accuracy.

LR and the MLP ("NN") on Adult; a CPU-scale ResNet-18 and SmallViT on scikit-learn's digits (or,
with ``--preset paper``, the paper-scale widths). Everything runs offline.

    python -m experiments.train_baselines [--preset quick|paper] [--out DIR]

Writes ``DIR/results.json``, ``DIR/report.md`` and resumable Orbax checkpoints under
``DIR/checkpoints/<model>``: an interrupted run picks up from the last finished epoch.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import optax

from experiments import common
from jaxunlearn import checkpoint, data, models, train

# name -> (dataset, model factory, optimizer, epochs, batch size, l2) per preset.
PRESETS = {
    "quick": {
        "adult_lr": dict(dataset="adult", model="lr", lr=1e-2, epochs=8, batch_size=256, l2=1e-5),
        "adult_mlp": dict(dataset="adult", model="mlp", lr=1e-3, epochs=15, batch_size=256, l2=1e-4),
        "digits_resnet18": dict(dataset="digits", model="resnet18", width=8, lr=3e-3, epochs=25,
                                batch_size=64, l2=1e-5),
        "digits_vit": dict(dataset="digits", model="vit", lr=2e-3, epochs=40, batch_size=64, l2=1e-5,
                           patch_size=2, depth=3, width=64, heads=4, mlp_dim=128),
    },
    "paper": {
        "adult_lr": dict(dataset="adult", model="lr", lr=1e-2, epochs=30, batch_size=256, l2=1e-5),
        "adult_mlp": dict(dataset="adult", model="mlp", lr=1e-3, epochs=30, batch_size=256, l2=1e-5),
        "digits_resnet18": dict(dataset="digits", model="resnet18", width=16, lr=3e-3, epochs=60,
                                batch_size=64, l2=1e-5),
        "digits_vit": dict(dataset="digits", model="vit", lr=1e-3, epochs=100, batch_size=64,
                           l2=1e-5, patch_size=2, depth=4, width=96, heads=4, mlp_dim=192),
    },
}


def build_model(cfg: dict, ds) -> models.Model:
    """The model named by ``cfg["model"]`` for dataset ``ds``."""
    shape = tuple(ds.train["x"].shape[1:])
    k = 1 if ds.num_classes == 2 else ds.num_classes
    if cfg["model"] == "lr":
        return models.logistic_regression(shape[0], k)
    if cfg["model"] == "mlp":
        return models.mlp(shape[0], k)
    if cfg["model"] == "resnet18":
        return models.resnet18(shape, k, width=cfg["width"])
    if cfg["model"] == "vit":
        return models.small_vit(shape, k, patch_size=cfg["patch_size"], depth=cfg["depth"],
                                width=cfg["width"], heads=cfg["heads"], mlp_dim=cfg["mlp_dim"])
    raise ValueError(f"unknown model {cfg['model']!r}")


def load(name: str):
    if name == "adult":
        return data.load_adult()
    if name == "digits":
        return data.load_digits()
    raise ValueError(f"unknown dataset {name!r}")


def train_one(name: str, cfg: dict, ds, out: str, seed: int, progress: bool) -> dict:
    """Train one baseline (resuming from its checkpoints) and evaluate it."""
    model = build_model(cfg, ds)
    steps_per_epoch = data.num_batches(len(ds.train["y"]), cfg["batch_size"])
    schedule = optax.cosine_decay_schedule(cfg["lr"], cfg["epochs"] * steps_per_epoch)
    tx = optax.adam(schedule)
    key = jax.random.key(seed)
    state = train.create_train_state(model, tx, jax.random.fold_in(key, 0), ds.train["x"][:1])
    step = train.make_train_step(model.apply, tx, l2=cfg["l2"])
    ck = checkpoint.Checkpointer(os.path.join(out, "checkpoints", name))
    t0 = time.perf_counter()
    state, history = train.fit(state, step, ds.train, batch_size=cfg["batch_size"],
                               epochs=cfg["epochs"], key=jax.random.fold_in(key, 1),
                               checkpoints=ck, progress=progress, desc=name)
    seconds = time.perf_counter() - t0
    ck.close()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    row = {"model": name, "dataset": ds.name, "params": n_params, "epochs": cfg["epochs"],
           "train_seconds": seconds}
    for split in ("train", "val", "test"):
        ev = train.evaluate(model.apply, state.variables, getattr(ds, split))
        row[f"{split}_accuracy"] = ev["accuracy"]
        row[f"{split}_loss"] = ev["loss"]
    row["history"] = history
    return row


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], default_out="runs/train_baselines", argv=argv)
    datasets = {}
    rows = []
    for name, cfg in PRESETS[args.preset].items():
        if cfg["dataset"] not in datasets:
            datasets[cfg["dataset"]] = load(cfg["dataset"])
        row = train_one(name, cfg, datasets[cfg["dataset"]], args.out, args.seed,
                        not args.no_progress)
        print(f"{name:18s} test accuracy {row['test_accuracy']:.4f}  "
              f"({row['train_seconds']:.1f} s, {row['params']} parameters)", flush=True)
        rows.append(row)
    results = {"preset": args.preset, "seed": args.seed, "environment": common.environment(),
               "models": rows}
    common.write_json(os.path.join(args.out, "results.json"), results)
    cols = ["model", "dataset", "params", "epochs", "train_accuracy", "val_accuracy",
            "test_accuracy", "train_seconds"]
    report = (f"# Baseline models ({args.preset} preset)\n\n"
              + common.markdown_table(rows, cols) + "\n")
    common.write_text(os.path.join(args.out, "report.md"), report)
    print(report)
    return results


if __name__ == "__main__":
    main()
