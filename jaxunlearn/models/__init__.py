"""Models behind one contract (see :mod:`jaxunlearn.models.api`):
``apply(variables, x, *, train=False, mask=None, capture_norm=False) -> (logits, aux)``.

Built-in Flax Linen models, and adapters for a plain function (:func:`from_function`), a Linen
(:func:`from_linen`), NNX (:func:`from_nnx`) or Equinox (:func:`from_equinox`) model; any other
``apply`` is brought to the contract by :func:`as_apply`.
"""

from jaxunlearn.models.api import (
    Model, as_apply, from_function, from_linen, split_variables, check_input)
from jaxunlearn.models.simple import LogisticRegression, MLP, logistic_regression, mlp
from jaxunlearn.models.resnet import ResNet, BasicBlock, Bottleneck, resnet, resnet18, resnet50
from jaxunlearn.models.vit import SmallViT, small_vit
from jaxunlearn.models.nnx_adapter import from_nnx
from jaxunlearn.models.equinox_adapter import from_equinox
from jaxunlearn.models.partition import (
    split_head, merge_head, block_names, last_k_mask, reinit_masked, norm_layer_names)
