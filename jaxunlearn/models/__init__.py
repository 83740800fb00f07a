"""Flax models behind one contract: ``apply(variables, x, *, train) -> (logits, aux)``."""

from jaxunlearn.models.api import Model, from_linen, split_variables, check_input
from jaxunlearn.models.simple import LogisticRegression, MLP, logistic_regression, mlp
from jaxunlearn.models.resnet import ResNet, BasicBlock, Bottleneck, resnet, resnet18, resnet50
from jaxunlearn.models.vit import SmallViT, small_vit
from jaxunlearn.models.nnx_adapter import from_nnx
from jaxunlearn.models.partition import (
    split_head, merge_head, block_names, last_k_mask, reinit_masked, norm_layer_names)
