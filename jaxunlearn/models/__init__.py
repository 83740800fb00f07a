"""Flax Linen models behind one contract: ``apply(variables, x, *, train) -> (logits, aux)``."""

from jaxunlearn.models.api import Model, from_linen, split_variables, check_input
from jaxunlearn.models.simple import LogisticRegression, MLP, logistic_regression, mlp
