"""Datasets as dicts of arrays ``{x, y, group, index}``, splits, forget sets and batching."""

from jaxunlearn.data.batching import batch_plan, gather_batch, iterate_batches, num_batches, split_size
