"""Logistic regression and the papers' "NN" (two hidden ReLU layers and a linear head)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxunlearn.models.api import Model, from_linen

__all__ = ["LogisticRegression", "MLP", "logistic_regression", "mlp"]


class LogisticRegression(nn.Module):
    """A single linear layer; its "features" are the (flattened) inputs themselves."""

    num_outputs: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        logits = nn.Dense(self.num_outputs, use_bias=self.use_bias, name="head")(x)
        return logits, x


class MLP(nn.Module):
    """Hidden ReLU layers followed by a linear head named ``head`` (seed 004's "NN")."""

    hidden: Sequence[int] = (64, 32)
    num_outputs: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense_{i}")(h))
        return nn.Dense(self.num_outputs, name="head")(h), h


def logistic_regression(input_dim: int, num_outputs: int = 1, *, use_bias: bool = True) -> Model:
    """Logistic (num_outputs = 1) or softmax regression on flat inputs of size ``input_dim``."""
    return from_linen(LogisticRegression(num_outputs, use_bias), (input_dim,), num_outputs)


def mlp(input_dim: int, num_outputs: int = 1, *, hidden: Sequence[int] = (64, 32)) -> Model:
    """The two-hidden-layer ReLU network with a linear head."""
    return from_linen(MLP(tuple(hidden), num_outputs), (input_dim,), num_outputs)
