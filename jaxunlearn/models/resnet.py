"""ResNet-18 / ResNet-50 (He et al., 2016) with BatchNorm, CIFAR and ImageNet stems.

Seed 001 trains ResNet-50 on CIFAR-10; the CPU-scale tests use the same code with a small
``width``. Layout (1-based names, stable across widths and depths)::

    stem                   conv (3x3 s1 "cifar" | 7x7 s2 + 3x3 max-pool s2 "imagenet"), bn
    stage{s}_block{b}      BasicBlock (conv1, bn1, conv2, bn2) or
                           Bottleneck (conv1, bn1, conv2, bn2, conv3, bn3),
                           plus proj_conv, proj_bn when the shortcut changes shape
    head                   Dense on the global-average-pooled features

Stages 2-4 halve the resolution (stride 2 in the block's first 3x3 conv, as in torchvision's
ResNet v1.5). BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum=0.9``,
``epsilon=1e-5``) and honours a [B] ``mask``: samples with ``mask=False`` (padding) are left out of
the batch statistics, so they change neither the running averages nor the real samples' outputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunlearn.models.api import Model, from_linen

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet", "resnet18", "resnet50", "STEMS"]

STEMS = ("cifar", "imagenet")
_STEM_DOWNSAMPLE = {"cifar": 1, "imagenet": 4}
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming


def _conv(features: int, k: int, strides: int, name: str, dtype: Any) -> nn.Conv:
    return nn.Conv(features, (k, k), (strides, strides), padding="SAME", use_bias=False,
                   kernel_init=_conv_init, dtype=dtype, name=name)


def _bn(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


def _bn_mask(mask: jax.Array | None, train: bool) -> jax.Array | None:
    """[B] bool -> [B, 1, 1, 1] so that it broadcasts against NHWC activations."""
    if mask is None or not train:
        return None
    return jnp.asarray(mask, bool).reshape((-1, 1, 1, 1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels: ``filters``."""

    filters: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        m = _bn_mask(mask, train)
        conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype)
        y = conv(self.filters, 3, self.strides, "conv1")(x)
        y = nn.relu(_bn("bn1", train, self.dtype)(y, mask=m))
        y = conv(self.filters, 3, 1, "conv2")(y)
        y = _bn("bn2", train, self.dtype)(y, mask=m)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = conv(self.filters, 1, self.strides, "proj_conv")(x)
            x = _bn("proj_bn", train, self.dtype)(x, mask=m)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand (ResNet-50). Output: 4 * ``filters``."""

    filters: int
    strides: int = 1
    expansion: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        m = _bn_mask(mask, train)
        out = self.filters * self.expansion
        conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype)
        y = conv(self.filters, 1, 1, "conv1")(x)
        y = nn.relu(_bn("bn1", train, self.dtype)(y, mask=m))
        y = conv(self.filters, 3, self.strides, "conv2")(y)
        y = nn.relu(_bn("bn2", train, self.dtype)(y, mask=m))
        y = conv(out, 1, 1, "conv3")(y)
        y = _bn("bn3", train, self.dtype)(y, mask=m)
        if x.shape[-1] != out or self.strides != 1:
            x = conv(out, 1, self.strides, "proj_conv")(x)
            x = _bn("proj_bn", train, self.dtype)(x, mask=m)
        return nn.relu(x + y)


class _Stem(nn.Module):
    width: int
    kind: str = "cifar"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        k, s = (3, 1) if self.kind == "cifar" else (7, 2)
        x = _conv(self.width, k, s, "conv", self.dtype)(x)
        x = nn.relu(_bn("bn", train, self.dtype)(x, mask=_bn_mask(mask, train)))
        if self.kind == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        return x


class ResNet(nn.Module):
    """A ResNet; ``__call__(x [B, H, W, C], train, mask=None) -> (logits [B, K], features [B, F])``.

    Attributes:
      stage_sizes: residual blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      bottleneck: Bottleneck blocks (ResNet-50) instead of BasicBlocks.
      num_outputs: K.
      width: channels of the stem and of stage 1 (64 at paper scale); stage s uses width * 2^(s-1)
        (times 4 at the output of a Bottleneck).
      stem: "cifar" (3x3 stride-1 conv, no pooling) or "imagenet" (7x7 stride-2 conv + max-pool).
      dtype: computation dtype (parameters and batch statistics stay float32); logits are float32.
    """

    stage_sizes: Sequence[int]
    bottleneck: bool = False
    num_outputs: int = 10
    width: int = 64
    stem: str = "cifar"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = jnp.asarray(x, self.dtype)
        x = _Stem(self.width, self.stem, self.dtype, name="stem")(x, train, mask)
        block = Bottleneck if self.bottleneck else BasicBlock
        for s, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                strides = 2 if s > 0 and b == 0 else 1
                x = block(self.width * 2 ** s, strides, dtype=self.dtype,
                          name=f"stage{s + 1}_block{b + 1}")(x, train, mask)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(features)
        return jnp.asarray(logits, jnp.float32), jnp.asarray(features, jnp.float32)


def _resolve_stem(input_shape: Sequence[int], stem: str, num_stages: int) -> str:
    if len(input_shape) != 3:
        raise ValueError(f"ResNet expects per-example inputs [H, W, C], got input_shape "
                         f"{tuple(input_shape)}")
    h, w, c = input_shape
    if min(h, w, c) < 1:
        raise ValueError(f"ResNet input_shape must be positive, got {tuple(input_shape)}")
    if stem == "auto":
        stem = "cifar" if max(h, w) <= 32 else "imagenet"
    if stem not in STEMS:
        raise ValueError(f"stem must be 'auto' or one of {STEMS}, got {stem!r}")
    # Total down-sampling of stem and stages; a smaller input collapses before the last stage.
    need = _STEM_DOWNSAMPLE[stem] * 2 ** (num_stages - 1)
    if min(h, w) < need:
        hint = " (use stem='cifar' for small images)" if stem == "imagenet" else ""
        raise ValueError(f"the {stem} stem down-samples by {need}, so inputs must be at least "
                         f"{need}x{need}; got {h}x{w}{hint}")
    return stem


def resnet(input_shape: Sequence[int], num_outputs: int, *, stage_sizes: Sequence[int],
           bottleneck: bool, width: int = 64, stem: str = "auto", dtype: Any = jnp.float32) -> Model:
    """A ResNet :class:`~jaxunlearn.models.api.Model`.

    Args:
      input_shape: per-example (H, W, C).
      num_outputs: number of logits K.
      stage_sizes: residual blocks per stage.
      bottleneck: Bottleneck (True) or BasicBlock (False) blocks.
      width: base channel count (64 at paper scale; 4-16 at CPU scale).
      stem: "cifar", "imagenet" or "auto" (cifar for inputs of at most 32x32, else imagenet).
      dtype: computation dtype.

    Raises:
      ValueError: on a non-image ``input_shape``, an unknown stem, an input smaller than the total
        down-sampling (8 with the cifar stem, 32 with the imagenet stem, for four stages), or
        non-positive sizes.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if width < 1 or num_outputs < 1 or not stage_sizes or min(stage_sizes) < 1:
        raise ValueError(f"width, num_outputs and stage_sizes must be positive, got width={width}, "
                         f"num_outputs={num_outputs}, stage_sizes={tuple(stage_sizes)}")
    stem = _resolve_stem(input_shape, stem, len(stage_sizes))
    module = ResNet(tuple(stage_sizes), bottleneck, num_outputs, width, stem, dtype)
    return from_linen(module, input_shape, num_outputs, uses_mask=True)


def resnet18(input_shape: Sequence[int], num_outputs: int, *, width: int = 64,
             stem: str = "auto", dtype: Any = jnp.float32) -> Model:
    """ResNet-18: BasicBlocks (2, 2, 2, 2). See :func:`resnet`."""
    return resnet(input_shape, num_outputs, stage_sizes=(2, 2, 2, 2), bottleneck=False,
                  width=width, stem=stem, dtype=dtype)


def resnet50(input_shape: Sequence[int], num_outputs: int, *, width: int = 64,
             stem: str = "auto", dtype: Any = jnp.float32) -> Model:
    """ResNet-50: Bottlenecks (3, 4, 6, 3), features of 32 * width. See :func:`resnet`."""
    return resnet(input_shape, num_outputs, stage_sizes=(3, 4, 6, 3), bottleneck=True,
                  width=width, stem=stem, dtype=dtype)
