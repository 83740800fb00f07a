"""SmallViT: a pre-LayerNorm Vision Transformer (Dosovitskiy et al., 2021) for small images.

Seed 001 uses a "SmallViT" on CIFAR-10 without giving its configuration, so every size is a
keyword. Layout (1-based names)::

    embed          patch conv (patch x patch, stride patch), [cls token], learned positions
    block{i}       ln1 -> attn -> residual; ln2 -> mlp_fc1 -> gelu -> mlp_fc2 -> residual
    head_norm      final LayerNorm
    head           Dense on the pooled representation (class token or mean of the tokens)

``features`` is the head's input: the pooled output of ``head_norm``. No dropout, so training is
deterministic given the data order; ``mask`` is accepted and ignored (LayerNorm normalises each
sample on its own).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxunlearn.models.api import Model, from_linen

__all__ = ["SmallViT", "EncoderBlock", "small_vit", "POOLS"]

POOLS = ("cls", "mean")


class _Embed(nn.Module):
    patch_size: int
    width: int
    pool: str = "cls"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="patch")(x)
        b, h, w, d = x.shape
        x = x.reshape((b, h * w, d))
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], d))
        return x + pos.astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                            deterministic=True, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_fc1")(y))
        y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_fc2")(y)
        return x + y


class SmallViT(nn.Module):
    """``__call__(x [B, H, W, C], train, mask=None) -> (logits [B, K], features [B, width])``.

    Attributes:
      num_outputs: K.
      patch_size: side of the square patches (must divide H and W).
      depth: number of transformer blocks.
      width: token dimension (must be divisible by ``heads``).
      heads: attention heads.
      mlp_dim: hidden size of each block's MLP.
      pool: "cls" (class token) or "mean" (mean over the patch tokens).
      dtype: computation dtype; logits and features are returned as float32.
    """

    num_outputs: int = 10
    patch_size: int = 4
    depth: int = 6
    width: int = 192
    heads: int = 3
    mlp_dim: int = 384
    pool: str = "cls"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        del train, mask  # no batch statistics, no dropout
        x = jnp.asarray(x, self.dtype)
        x = _Embed(self.patch_size, self.width, self.pool, self.dtype, name="embed")(x)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dtype, name=f"block{i + 1}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="head_norm")(x)
        features = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        logits = nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(features)
        return jnp.asarray(logits, jnp.float32), jnp.asarray(features, jnp.float32)


def small_vit(input_shape: Sequence[int], num_outputs: int, *, patch_size: int = 4,
              depth: int = 6, width: int = 192, heads: int = 3, mlp_dim: int = 384,
              pool: str = "cls", dtype: Any = jnp.float32) -> Model:
    """A :class:`SmallViT` :class:`~jaxunlearn.models.api.Model`.

    Args:
      input_shape: per-example (H, W, C); H and W must be multiples of ``patch_size``.
      num_outputs: number of logits K.
      patch_size, depth, width, heads, mlp_dim, pool: see :class:`SmallViT`. The defaults are a
        ViT-Tiny-like configuration for 32x32 images (64 patches of 4x4).
      dtype: computation dtype.

    Raises:
      ValueError: on a non-image ``input_shape``, a patch size that does not divide it, a width not
        divisible by ``heads``, an unknown ``pool`` or non-positive sizes.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"SmallViT expects per-example inputs [H, W, C], got input_shape "
                         f"{input_shape}")
    sizes = dict(num_outputs=num_outputs, patch_size=patch_size, depth=depth, width=width,
                 heads=heads, mlp_dim=mlp_dim)
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad or min(input_shape) < 1:
        raise ValueError(f"SmallViT sizes must be positive, got {bad or input_shape}")
    h, w, _ = input_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the input size {h}x{w}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    module = SmallViT(num_outputs, patch_size, depth, width, heads, mlp_dim, pool, dtype)
    return from_linen(module, input_shape, num_outputs, uses_mask=True)
