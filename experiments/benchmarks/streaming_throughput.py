"""Streaming input (grain over TFDS array_record) against the in-memory path, batches per second.

Workload: a CIFAR-10-shaped array_record dataset (32x32x3 PNG images, written offline by
``tests/tfds_fixtures.py`` unless ``--data_dir`` already holds one), one shuffled, weighted epoch
in batches of ``--batch_size``.

* ``in_memory``: the default path: the split read into memory once (``load_cifar10``, timed
  separately as ``load_seconds``), put on device, then per batch the jitted
  :func:`~jaxunlearn.data.batching.gather_batch` of the epoch's :func:`batch_plan`
  (``block_until_ready``).
* ``streaming[threads=T]``: :class:`~jaxunlearn.data.streaming.StreamingLoader` reading and
  decoding every batch from disk with T grain reader threads (0: the calling thread), then
  ``jax.device_put`` of the batch (``block_until_ready``).

Both run in the same process on the same data and plan; each figure is the median over
``--repeats`` epochs after one warm-up epoch. Output: one JSON object on stdout (and ``--out``).

    python -m experiments.benchmarks.streaming_throughput --num_train 4096 --batch_size 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data import (StreamingLoader, batch_plan, gather_batch, load_cifar10,
                             tfds_streaming_source)


def _write_fixture(data_dir: str, num_train: int) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "tfds_fixtures.py")
    spec = importlib.util.spec_from_file_location("tfds_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_tiny_cifar10(data_dir, num_train=num_train, num_test=64)


def _median_rate(run_epoch, repeats: int) -> tuple[float, float]:
    run_epoch()  # warm-up (compilation, file cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nb = run_epoch()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return nb / t, t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir holding cifar10 (array_record)")
    ap.add_argument("--num_train", type=int, default=4096)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 2, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
        _write_fixture(data_dir, args.num_train)

    key = jax.random.key(0)
    src = tfds_streaming_source("cifar10", "train", data_dir=data_dir)
    n, B = len(src), args.batch_size
    w = np.ones(n, np.float32)
    index, bw = batch_plan(n, B, key=jax.random.fold_in(jax.random.fold_in(key, 0), 0), weight=w)
    rows = {"num_train": n, "batch_size": B, "batches_per_epoch": int(index.shape[0]),
            "device": str(jax.devices()[0].platform), "cpu_count": os.cpu_count()}

    t0 = time.perf_counter()
    split = load_cifar10(data_dir=data_dir, progress=False).train
    rows["in_memory_load_seconds"] = time.perf_counter() - t0
    data = {k: jnp.asarray(split[k]) for k in ("x", "y", "group", "index")}
    gather = jax.jit(gather_batch)
    idx_d, bw_d = jnp.asarray(index), jnp.asarray(bw)

    def in_memory_epoch():
        for s in range(index.shape[0]):
            jax.block_until_ready(gather(data, idx_d[s], bw_d[s]))
        return index.shape[0]

    rate, sec = _median_rate(in_memory_epoch, args.repeats)
    rows["in_memory"] = {"batches_per_s": rate, "epoch_seconds": sec}

    for threads in args.threads:
        loader = StreamingLoader(src, B, key=key, weight=w, num_threads=threads, prefetch=4)

        def streaming_epoch():
            nb = 0
            for batch in loader.epoch(0):
                jax.block_until_ready(jax.device_put(batch))
                nb += 1
            return nb

        rate, sec = _median_rate(streaming_epoch, args.repeats)
        rows[f"streaming[threads={threads}]"] = {"batches_per_s": rate, "epoch_seconds": sec}

    print(json.dumps(rows, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
