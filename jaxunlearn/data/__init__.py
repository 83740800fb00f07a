"""Datasets as dicts of arrays ``{x, y, group, index}``, splits, forget sets and batching.

Modules: :mod:`dataset` (the split contract, :class:`Dataset`, errors), :mod:`splits` (seeded
splits, standardiser), :mod:`tabular` (Adult, German credit, Bank), :mod:`images` (digits,
Waterbirds, FairFace), :mod:`tfds_loaders` (CIFAR-10/100, CelebA, Civil Comments via
``tfds.data_source``), :mod:`forget` (forget-set builders, forget/retain splits, weights),
:mod:`batching` (weighted, padded batches), :mod:`streaming` (the same batches read from disk
with grain, for data larger than memory; multi-host).
"""

from jaxunlearn.data.batching import (batch_plan, gather_batch, iterate_batches, num_batches,
                                      resample_plan, split_size)
from jaxunlearn.data.dataset import (
    ChecksumError,
    DataError,
    Dataset,
    MissingDataError,
    make_split,
    split_len,
    validate_split,
)
from jaxunlearn.data.forget import (
    ForgetSetError,
    check_forget_rows,
    forget_class,
    forget_group,
    forget_indices,
    forget_mask,
    forget_random,
    forget_retain_splits,
    forget_top_fraction,
    forget_top_k,
    group_cells,
)
from jaxunlearn.data.images import (
    load_digits,
    load_digits_spurious,
    load_fairface,
    load_waterbirds,
    resize_image,
)
from jaxunlearn.data.splits import (
    Standardizer,
    fit_standardizer,
    host_rng,
    random_split,
    split_rows,
    standardize,
    standardize_splits,
    subsample_rows,
    take,
)
from jaxunlearn.data.tabular import load_adult, load_bank, load_german
from jaxunlearn.data.streaming import (
    StreamingLoader,
    StreamingSource,
    global_batch,
    process_slice,
    tfds_streaming_source,
)
from jaxunlearn.data.tfds_loaders import (
    ImageRecord,
    celeb_a_record,
    cifar_record,
    hash_text_features,
    load_celeb_a,
    load_cifar10,
    load_cifar100,
    load_civil_comments,
)
