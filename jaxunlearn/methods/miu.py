"""MIU: Mutual Information-aware machine Unlearning (De Min et al. 2025, seeds 002/003).

Groups are the (target, sensitive) cells ``g = s + y |S|`` (``G = K |S|`` of them), ``c = onehot(g)``
and ``z`` the penultimate features. Two MINE estimators (:mod:`jaxunlearn.mutual_information`,
``T(z, c)`` = Linear(512) -> ReLU -> Linear(1)) give Donsker-Varadhan estimates

    MI_T(z, g) = mean_w T(z, c) - log mean_w exp T(z, c~),     c~ ~ Q_C,

``T_unl`` on the unlearned model's features and ``T_orig`` on the frozen original model's (eval
mode). ``Q_C`` is uniform over the G cells by default, as in the reference: a forget set drawn from
*one* cell has ``c~ = c`` under a shuffled marginal, so its bound would be identically 0. With a
uniform ``c~`` and ``T`` near the optimum ``log p(g | z) + log G`` of the *training* distribution, the
forget objective is ``mean_f log p(g_f | z_f)``: it moves forget features away from their group.

One ``update`` takes a zipped (forget, retain) batch pair (:func:`jaxunlearn.loop.run`):

1. **Tuning** (first update of each epoch): ``tune_steps_first`` (epoch 0, reference 100) or
   ``tune_steps_epoch`` (later, reference 10) ascent steps of both estimators on batches of the
   training set ``tune_data`` (a shuffled, cycled pass), each with its own optimizer and the EMA of
   ``E[exp T]`` (:func:`~jaxunlearn.mutual_information.make_mine_step`).
2. **Forget step** (epochs ``< forget_epochs``, reference 5; on the first pass of the cycled forget
   loader, so one pass over D_f per epoch): minimise ``MI_unl(z_f, g_f)``.
3. **Retain step** (every update; the driver samples D_r with the group-reweighting sampler):

       L = weighted_mean(CE_r, w_r) + lambda_mi (MI_unl(z_r, g_r) - stopgrad MI_orig(z_orig, g_r))^2

   (the calibration loss; the same ``c~`` for both estimates, as the reference).

Both model steps share one optimizer state. Gradients of an MI estimate use the EMA-corrected
gradient of MINE (the value is the plain DV bound, the gradient that of
``mean T - mean exp T / stopgrad(ema)``; the reference's ``EMALoss``); every estimate a step uses
also moves its estimator's EMA (as the reference's ``MutualInformation.forward``).

**Weights.** A forget sample's weight ``eps_f`` (-1 hard) enters the DV bound as the importance
weight ``-eps_f`` of its empirical distribution (MI is a set-level quantity, not a sum of
per-sample losses); ``eps_f > 0`` has no meaning for an MI-minimising step: such a step is skipped
and flagged (:func:`check_estimators` raises). A retain sample's weight ``w_r`` weights its CE
and is its importance weight in both retain estimates.

**The reference's two quirks, decided** (``tdemin16/group-robust_machine_unlearning``,
``method/approaches/miu.py``; effects measured in BUILD_NOTES.md):

* Its ``tune_mine`` trains *both* estimators on the unlearned model's features, so ``T_orig`` is
  fitted to a distribution it is never evaluated on. Here ``T_orig`` is tuned on the original
  model's features (``original_estimator_features="original"``); ``"unlearned"`` reproduces it.
* Its ``gradient_clipping(model, mine)`` is called with the *original* model, whose parameters
  have no gradients, so MINE's gradients are multiplied by ``min_norm = 0``; the estimators'
  optimizers never step during unlearning either. Its estimators are thus frozen between tuning
  phases, which is also what the forget step needs (an estimator that kept ascending on
  single-cell forget batches would drift to the feature-independent optimum ``T(z, c) = T(c)``).
  Kept as the default (``estimator_updates="tuning"``); ``"every_step"`` adds one ascent step of
  each estimator per update on the retain batch (approximately the training distribution under the
  reweighting sampler), never on forget batches.

Smaller deviations: tuning features are computed in eval mode (the reference's tuning runs the
unlearned model in train mode, moving its BatchNorm statistics) and the original model is always
in eval mode; the forget steps of an epoch are interleaved with its first retain steps instead of
all preceding them (as :func:`~jaxunlearn.methods.scrub`); the model gradient uses the EMA before
the current batch is folded in (the reference's after).

**Divergence.** An estimate that is non-finite or exceeds ``max_nats`` in absolute value sets the
state's ``"diverged"`` flag; from then on the update leaves the model unchanged and reports a NaN
``"loss"`` (so :func:`~jaxunlearn.loop.run` raises ``FloatingPointError``), and
:func:`check_estimators` raises :class:`~jaxunlearn.mutual_information.MIDivergenceError` (a
``FloatingPointError``) on such a state.

Keys: in each ``update``, tuning uses ``fold_in(key, 0)``, the forget step's ``c~``
``fold_in(key, 1)``, the retain step's ``fold_in(key, 2)``, the per-step estimator ascent
``fold_in(key, 3)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import losses
from jaxunlearn import mutual_information as mi
from jaxunlearn import subsets
from jaxunlearn.data.streaming import materialize
from jaxunlearn.methods import base
from jaxunlearn.models.api import as_apply

__all__ = ["miu", "check_estimators", "cell_onehot"]

FEATURES = ("original", "unlearned")
ESTIMATOR_UPDATES = ("tuning", "every_step")


def cell_onehot(y, s, *, num_classes: int, num_sensitive: int) -> jax.Array:
    """``onehot(s + y |S|)`` [B, K |S|] float32: De Min et al.'s (target, sensitive) cell."""
    return jax.nn.one_hot(jnp.asarray(s) + jnp.asarray(y) * num_sensitive,
                          num_classes * num_sensitive, dtype=jnp.float32)


def _features(apply_fn, variables, x):
    """Eval-mode penultimate features [B, F] of a frozen model, gradient-stopped."""
    _, aux = as_apply(apply_fn)(jax.lax.stop_gradient(variables), x, train=False)
    return jax.lax.stop_gradient(aux["features"].reshape(x.shape[0], -1))


def _forward(apply_fn, params, model_state, x, weight):
    """Train-mode pass: ``(logits, features [B, F], model_state)``; weight-0 rows masked from BN."""
    logits, aux = as_apply(apply_fn)({"params": params, **model_state}, x, train=True, mask=weight != 0)
    new_state = aux.get("model_state") or {}
    return logits, aux["features"].reshape(x.shape[0], -1), (new_state if new_state else model_state)


def _estimate(est: mi.MineState, z, c, c_marg, weight):
    """``(estimate with the EMA-corrected gradient, E_batch[exp T])`` of an estimator on a batch."""
    neg_surrogate, (estimate, batch_exp) = mi.mine_objective(est.params, z, c, c_marg, est.ema, weight)
    surrogate = -neg_surrogate
    return surrogate + jax.lax.stop_gradient(estimate - surrogate), batch_exp


def _ema(est: mi.MineState, batch_exp, decay: float) -> mi.MineState:
    return est._replace(ema=decay * est.ema + (1.0 - decay) * jax.lax.stop_gradient(batch_exp))


def _healthy(values, max_nats: float):
    v = jnp.stack([jnp.asarray(x, jnp.float32) for x in values])
    return jnp.all(jnp.isfinite(v)) & jnp.all(jnp.abs(v) <= max_nats), jnp.max(jnp.abs(v))


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _require_group(batch: dict, name: str):
    if batch.get("group") is None:
        raise ValueError(f"MIU needs group labels: the {name} batch has no 'group' array "
                         "(the sensitive attribute of each sample)")
    return batch["group"]


def miu(apply_fn, tune_data: dict, *, num_classes: int, num_sensitive: int, key: jax.Array,
        lambda_mi: float = 10.0, forget_epochs: int = 5, tune_steps_first: int = 100,
        tune_steps_epoch: int = 10, tune_batch_size: int = 256,
        optimizer: optax.GradientTransformation | None = None,
        mine_optimizer: optax.GradientTransformation | None = None, mine_hidden: int = 512,
        ema_decay: float = 0.99, marginal: str = "uniform", original=None,
        original_estimator_features: str = "original", estimator_updates: str = "tuning",
        max_nats: float = 50.0, trainable=None, tune_sharding=None) -> base.Method:
    """MIU (module docstring).

    Args:
      apply_fn: the model's ``apply`` (``aux["features"]`` are the features z).
      tune_data: ``{"x", "y", "group"}`` samples the estimators are tuned on: the training set
        (D_f and D_r, the reference's ``train_loader``), or a random subset of it at scale (the
        reference sees ``(100 + 10 (E - 1)) B`` samples in all). It is held on device in the
        method state; a streamed split's ``x`` is read into memory once.
      num_classes: K (2 for a single binary logit).
      num_sensitive: |S|, the number of sensitive-attribute values.
      key: PRNG key of the two estimators' initialisation.
      lambda_mi: weight of the calibration loss (reference 10; the paper 1-10).
      forget_epochs: epochs with a forget step (reference 5).
      tune_steps_first: estimator steps before unlearning (reference 100).
      tune_steps_epoch: estimator steps at the start of every later epoch (reference 10).
      tune_batch_size: batch size of the tuning steps (reference: the unlearning batch size, 256).
      optimizer: the model's; default SGD lr 1e-3, momentum 0.9, weight decay 1e-4 (reference,
        with a cosine schedule the caller can pass as the learning rate).
      mine_optimizer: the estimators'; default SGD lr 0.01, momentum 0.9 (reference ``mine_lr``).
      mine_hidden: hidden width of T (512).
      ema_decay: decay of the EMA of ``E[exp T]`` (reference: 0.99).
      marginal: ``"uniform"`` (reference) or ``"shuffle"`` draws of ``c~``
        (:func:`~jaxunlearn.mutual_information.sample_marginal`).
      original: the original model's variables (default: those given to ``init``, theta_0).
      original_estimator_features: features ``T_orig`` is tuned on: ``"original"`` (default) or
        ``"unlearned"`` (the reference's quirk).
      estimator_updates: ``"tuning"`` (default; the reference's estimators only move in the tuning
        phases) or ``"every_step"`` (also one ascent step per update on the retain batch).
      max_nats: an estimate beyond this (or non-finite) counts as diverged.
      trainable: optional bool mask over ``variables["params"]``.
      tune_sharding: optional sharding of the tuning batches' leading axis, e.g.
        ``NamedSharding(mesh, PartitionSpec("data"))`` for a run on ``mesh``: the tuning steps
        (forward passes of both models and the estimator updates) are then split over the
        devices like the forget and retain batches, instead of being repeated on every device
        (the method runs replicated and the tuning batches are drawn inside the update, so the
        loop cannot split them). Results equal the unsharded run up to summation order. The
        tuning set itself stays replicated in the state.

    Returns:
      A :class:`~jaxunlearn.methods.base.Method` reading both sets (which need ``"group"``);
      ``state.extra`` holds both estimators and the flags :func:`check_estimators` reads.
    """
    if original_estimator_features not in FEATURES:
        raise ValueError(f"original_estimator_features must be one of {FEATURES}, "
                         f"got {original_estimator_features!r}")
    if estimator_updates not in ESTIMATOR_UPDATES:
        raise ValueError(f"estimator_updates must be one of {ESTIMATOR_UPDATES}, got {estimator_updates!r}")
    if marginal not in ("uniform", "shuffle"):
        raise ValueError(f"marginal must be 'uniform' or 'shuffle', got {marginal!r}")
    base.check_positive("lambda_mi", lambda_mi, allow_zero=True)
    base.check_positive("max_nats", max_nats)
    if not 0.0 <= float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    for name, v in (("forget_epochs", forget_epochs), ("tune_steps_first", tune_steps_first),
                    ("tune_steps_epoch", tune_steps_epoch)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if int(num_classes) < 2 or int(num_sensitive) < 1 or int(mine_hidden) < 1 or int(tune_batch_size) < 1:
        raise ValueError(f"need num_classes >= 2, num_sensitive >= 1, mine_hidden >= 1 and "
                         f"tune_batch_size >= 1; got {num_classes}, {num_sensitive}, {mine_hidden}, "
                         f"{tune_batch_size}")
    if not isinstance(tune_data, dict) or "x" not in tune_data or "y" not in tune_data:
        raise ValueError("MIU needs tune_data = {'x', 'y', 'group'} (the training set)")
    if tune_data.get("group") is None:
        raise ValueError("MIU needs group labels: tune_data has no 'group' array")
    ty, tg = np.asarray(tune_data["y"]), np.asarray(tune_data["group"])
    n_tune = int(ty.shape[0])
    if n_tune == 0 or ty.shape != (n_tune,) or tg.shape != (n_tune,) or np.shape(tune_data["x"])[0] != n_tune:
        raise ValueError(f"tune_data arrays must share a non-zero first dimension; got x "
                         f"{np.shape(tune_data['x'])}, y {ty.shape}, group {tg.shape}")
    if ty.min() < 0 or ty.max() >= num_classes or tg.min() < 0 or tg.max() >= num_sensitive:
        raise ValueError(f"tune_data labels must lie in [0, {num_classes}) and groups in "
                         f"[0, {num_sensitive}); got y in [{ty.min()}, {ty.max()}], group in "
                         f"[{tg.min()}, {tg.max()}]")
    K, S = int(num_classes), int(num_sensitive)
    G = K * S
    bt = min(int(tune_batch_size), n_tune)
    lambda_mi, ema_decay, max_nats = float(lambda_mi), float(ema_decay), float(max_nats)
    optimizer = base.sgd(1e-3, momentum=0.9, weight_decay=1e-4) if optimizer is None else \
        base.check_optimizer(optimizer, "MIU")
    mine_tx = optax.sgd(0.01, momentum=0.9) if mine_optimizer is None else \
        base.check_optimizer(mine_optimizer, "MIU (estimators)")
    subset = subsets.resolve(trainable)
    tx = subsets.masked(optimizer, subset)
    mine_step = mi.make_mine_step(mine_tx, ema_decay=ema_decay, marginal=marginal)
    tune_on_original = original_estimator_features == "original"
    cells = jnp.asarray(tg.astype(np.int32) + ty.astype(np.int32) * S)
    tune_x = jnp.asarray(materialize(tune_data["x"]))  # held in the state: a streamed x is read once

    def onehot(batch):
        return cell_onehot(batch["y"], batch["group"], num_classes=K, num_sensitive=S)

    def init(variables):
        orig = variables if original is None else original
        z_dim = jax.eval_shape(lambda v, x: _features(apply_fn, v, x), variables, tune_x[:1]).shape[1]
        k_u, k_o = jax.random.split(key)
        extra = {
            "original": jax.tree.map(jnp.array, orig),
            "estimator_unlearned": mi.create_mine_state(k_u, z_dim, G, mine_tx, hidden=int(mine_hidden)),
            "estimator_original": mi.create_mine_state(k_o, z_dim, G, mine_tx, hidden=int(mine_hidden)),
            "tune_x": tune_x,
            "tune_cells": cells,
            "tuned_epoch": jnp.asarray(-1, jnp.int32),
            "diverged": jnp.asarray(False),
            "invalid_forget_weight": jnp.asarray(False),
            "max_abs_mi": jnp.zeros((), jnp.float32),
            "tune_mi": jnp.zeros((2,), jnp.float32),  # last tuning estimates (unlearned, original)
        }
        return base.init_state(variables, tx, subset, extra)

    def tune(variables, extra, steps, key):
        """``steps`` ascent steps of both estimators on shuffled, cycled tuning batches."""
        perm = jax.random.permutation(jax.random.fold_in(key, 0), n_tune)

        def body(t, carry):
            est_u, est_o, worst, last = carry
            idx = perm[(t * bt + jnp.arange(bt)) % n_tune]
            x = extra["tune_x"][idx]
            c = jax.nn.one_hot(extra["tune_cells"][idx], G, dtype=jnp.float32)
            if tune_sharding is not None:
                x, c = jax.lax.with_sharding_constraint((x, c), tune_sharding)
            z_u = _features(apply_fn, variables, x)
            z_o = _features(apply_fn, extra["original"], x) if tune_on_original else z_u
            k = jax.random.fold_in(key, t + 1)
            est_u, mi_u = mine_step(est_u, z_u, c, jax.random.fold_in(k, 0))
            est_o, mi_o = mine_step(est_o, z_o, c, jax.random.fold_in(k, 1))
            ok, size = _healthy((mi_u, mi_o), max_nats)
            worst = jnp.where(ok, jnp.maximum(worst, size), jnp.inf)
            return est_u, est_o, worst, jnp.stack([mi_u, mi_o]).astype(jnp.float32)

        init_carry = (extra["estimator_unlearned"], extra["estimator_original"],
                      jnp.zeros((), jnp.float32), extra["tune_mi"])
        return jax.lax.fori_loop(0, steps, body, init_carry)

    def update(variables, state, batches, key):
        fb = base.require(batches, "forget", "MIU")
        rb = base.require(batches, "retain", "MIU")
        _require_group(fb, "forget")
        _require_group(rb, "retain")
        extra = dict(state.extra)
        epoch = state.epoch

        # 1. Tuning at the first update of an epoch.
        steps = jnp.where(epoch == 0, int(tune_steps_first), int(tune_steps_epoch))
        new_epoch = epoch != extra["tuned_epoch"]
        no_tuning = (extra["estimator_unlearned"], extra["estimator_original"],
                     jnp.zeros((), jnp.float32), extra["tune_mi"])
        if int(tune_steps_first) or int(tune_steps_epoch):
            est_u, est_o, worst, tune_mi = jax.lax.cond(
                new_epoch, lambda: tune(variables, extra, steps, jax.random.fold_in(key, 0)),
                lambda: no_tuning)
        else:
            est_u, est_o, worst, tune_mi = no_tuning
        diverged = extra["diverged"] | ~jnp.isfinite(worst) | (worst > max_nats)
        max_abs = jnp.maximum(extra["max_abs_mi"], jnp.where(jnp.isfinite(worst), worst, jnp.inf))
        extra.update(estimator_unlearned=est_u, estimator_original=est_o, tune_mi=tune_mi,
                     tuned_epoch=jnp.where(new_epoch, epoch, extra["tuned_epoch"]).astype(jnp.int32))

        # 2. Forget step: minimise MI_unl(z_f, g_f).
        c_f = onehot(fb)
        c_f_marg = mi.sample_marginal(jax.random.fold_in(key, 1), c_f, marginal=marginal)
        bad_weight = jnp.any(fb["weight"] > 0)

        def forget_loss(params, model_state):
            _, z, model_state = _forward(apply_fn, params, model_state, fb["x"], fb["weight"])
            est, batch_exp = _estimate(est_u, z, c_f, c_f_marg, -fb["weight"])
            return est, (model_state, {"batch_exp": batch_exp})

        def do_forget(carry):
            v, o = carry
            v2, o2, mi_f, m = base.gradient_step(forget_loss, v, o, tx, subset)
            ok, size = _healthy((mi_f,), max_nats)
            ok = ok & ~diverged & ~bad_weight
            return (_select(ok, v2, v), _select(ok, o2, o), mi_f, m["batch_exp"], ok,
                    jnp.where(bad_weight, 0.0, size))

        def skip_forget(carry):
            v, o = carry
            z = jnp.zeros((), jnp.float32)
            return v, o, z, z, jnp.asarray(True), z

        active = ((epoch < int(forget_epochs)) & base.first_pass(fb)
                  & jnp.any(fb["weight"] != 0))
        if int(forget_epochs):
            variables, opt_state, mi_forget, bexp_f, ok_f, size_f = jax.lax.cond(
                active, do_forget, skip_forget, (variables, state.opt_state))
        else:
            variables, opt_state, mi_forget, bexp_f, ok_f, size_f = skip_forget(
                (variables, state.opt_state))
        forget_ran = active & ok_f
        diverged = diverged | (active & ~ok_f & ~bad_weight)
        max_abs = jnp.maximum(max_abs, jnp.where(active, size_f, 0.0))
        est_u = _select(forget_ran, _ema(est_u, bexp_f, ema_decay), est_u)

        # 3. Retain step: CE + lambda_mi (MI_unl(z_r) - stopgrad MI_orig(z_orig))^2.
        c_r = onehot(rb)
        c_r_marg = mi.sample_marginal(jax.random.fold_in(key, 2), c_r, marginal=marginal)
        w_r = rb["weight"]
        z_orig = _features(apply_fn, extra["original"], rb["x"])
        target, bexp_o = _estimate(est_o, z_orig, c_r, c_r_marg, w_r)
        target = jax.lax.stop_gradient(target)

        def retain_loss(params, model_state):
            logits, z, model_state = _forward(apply_fn, params, model_state, rb["x"], w_r)
            ce = losses.weighted_mean(losses.cross_entropy(logits, rb["y"]), w_r)
            est, batch_exp = _estimate(est_u, z, c_r, c_r_marg, w_r)
            calib = jnp.square(est - target)
            return ce + lambda_mi * calib, (model_state, {
                "retain_ce": ce, "calibration": calib, "mi_retain": est, "batch_exp": batch_exp,
                "z": jax.lax.stop_gradient(z)})

        v2, o2, loss, m = base.gradient_step(retain_loss, variables, opt_state, tx, subset)
        ok_r, size_r = _healthy((m["mi_retain"], target), max_nats)
        diverged = diverged | ~ok_r
        max_abs = jnp.maximum(max_abs, size_r)
        keep = ~diverged
        variables, opt_state = _select(keep, v2, variables), _select(keep, o2, opt_state)

        if estimator_updates == "every_step":
            k = jax.random.fold_in(key, 3)
            z_for_orig = z_orig if tune_on_original else m["z"]
            est_u = _select(keep, mine_step(est_u, m["z"], c_r, jax.random.fold_in(k, 0), w_r)[0], est_u)
            est_o = _select(keep, mine_step(est_o, z_for_orig, c_r, jax.random.fold_in(k, 1), w_r)[0], est_o)
        else:
            est_u = _select(keep, _ema(est_u, m["batch_exp"], ema_decay), est_u)
            est_o = _select(keep, _ema(est_o, bexp_o, ema_decay), est_o)

        extra.update(estimator_unlearned=est_u, estimator_original=est_o, diverged=diverged,
                     invalid_forget_weight=extra["invalid_forget_weight"] | (active & bad_weight),
                     max_abs_mi=max_abs)
        # A diverged estimator makes the reported loss NaN, so loop.run stops the run loudly.
        metrics = {"loss": jnp.where(diverged, jnp.nan, loss), "retain_ce": m["retain_ce"],
                   "calibration": m["calibration"], "mi_retain": m["mi_retain"], "mi_original": target, "mi_forget": mi_forget,
                   "forget_step": forget_ran.astype(jnp.float32),
                   "tune_steps": jnp.where(new_epoch, steps, 0).astype(jnp.float32)}
        return variables, state._replace(step=state.step + 1, opt_state=opt_state, extra=extra), metrics

    return base.Method(init, update, name="MIU", apply_fn=apply_fn)


def check_estimators(state: base.MethodState) -> dict:
    """MIU's estimator diagnostics; raises when a run must not be trusted.

    Returns:
      ``{"max_abs_mi", "tune_mi_unlearned", "tune_mi_original", "ema_unlearned", "ema_original"}``.

    Raises:
      MIDivergenceError: an MI estimate became non-finite or exceeded ``max_nats`` (the model
        was left unchanged from that step on).
      ValueError: a forget sample had a positive weight (its forget steps were skipped).
    """
    extra = state.extra
    if "estimator_unlearned" not in extra:
        raise ValueError("check_estimators needs the state of a MIU run")
    out = {"max_abs_mi": float(extra["max_abs_mi"]),
           "tune_mi_unlearned": float(extra["tune_mi"][0]),
           "tune_mi_original": float(extra["tune_mi"][1]),
           "ema_unlearned": float(extra["estimator_unlearned"].ema),
           "ema_original": float(extra["estimator_original"].ema)}
    if bool(extra["diverged"]):
        raise mi.MIDivergenceError(
            f"MIU: an MI estimate diverged (largest |estimate| {out['max_abs_mi']:.4g} nats, or "
            "non-finite); the model was frozen from that step on. Lower the estimators' learning "
            "rate or raise max_nats if the values are plausible.")
    if bool(extra["invalid_forget_weight"]):
        raise ValueError("MIU: a forget sample had a positive weight eps_f > 0; MI minimisation needs "
                         "eps_f <= 0 (importance weight -eps_f), so those forget steps were skipped")
    return out
