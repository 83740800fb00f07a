"""A catalogue of bad inputs and faults: each must raise a clear error, before any compute, whose
message names the problem (issue 12). One row per case: (name, callable, error type, message regex).

Every callable takes ``tmp`` (a fresh directory). Library cases use tiny arrays and never train;
driver cases call ``main([...])`` in-process and stop at argument validation (a usage error, exit
status 2, whose stderr message is matched). BUILD_NOTES lists this table.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common
from jaxunlearn import checkpoint, evaluation, loop, methods, models, weights
from jaxunlearn.data import batching, tabular
from jaxunlearn.influence import last_layer, measurements, scores, solvers


class UsageError(Exception):
    """A driver's argparse error (SystemExit 2), carrying what it printed to stderr."""


def cli(driver: str, *argv: str):
    """A callable running ``experiments.<driver>.main([... , --out tmp])`` in-process."""

    def run(tmp):
        import importlib

        mod = importlib.import_module(f"experiments.{driver}")
        args = list(argv) if "--out" in argv else [*argv, "--out", str(tmp / "out")]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                mod.main(args + ["--no-progress"])
            except SystemExit as e:
                if e.code == 2:
                    raise UsageError(err.getvalue()) from None
                raise
        raise AssertionError(f"{driver} {argv} ran instead of refusing its arguments")

    return run


# ----------------------------------------------------------------------------- tiny fixtures

X = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
Y = np.arange(12, dtype=np.int32) % 2
G = (np.arange(12, dtype=np.int32) // 2) % 2


def lr(k=1):
    m = models.logistic_regression(3, k)
    return m, m.init(jax.random.key(0), X[:1])


def fit(split, *, k=1, method=None, **kw):
    m, v = lr(k)
    method = method or methods.train(m.apply, optax.sgd(0.1))
    opts = dict(batch_size=4, key=jax.random.key(0), progress=False)
    opts.update(kw)
    return loop.run(method, v, split, **opts)


def head():
    return {"kernel": jnp.asarray(np.ones((3, 1)) * 0.1)}


def influence(batch, measure_batch=None, solver=solvers.Direct()):
    with jax.enable_x64(True):
        prob = last_layer.make_problem(head(), batch, l2=0.1)
        mb = measure_batch if measure_batch is not None else batch
        return scores.influence_scores(prob, {"u": (measurements.utility(last_layer.head_apply), mb)},
                                       solver=solver, on_nonstationary="ignore")


def checkpoints(tmp, *, corrupt):
    """Two checkpoints of a small tree; truncate the array files of the steps in ``corrupt``."""
    ck = checkpoint.Checkpointer(tmp / "ck")
    tree = {"a": jnp.arange(64.0), "b": jnp.ones((3, 3))}
    for step in (1, 2):
        ck.save(step, tree, metadata={"epoch": step})
    ck.close()
    for step in corrupt:
        files = glob.glob(str(tmp / "ck" / str(step) / "default" / "**" / "d" / "*"), recursive=True)
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    return checkpoint.Checkpointer(tmp / "ck"), tree


def restore_all_corrupt(tmp):
    ck, tree = checkpoints(tmp, corrupt=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck.restore_latest(tree)


def restore_other_model(tmp):
    ck, tree = checkpoints(tmp, corrupt=())
    ck.restore_latest({"a": jnp.arange(64.0), "b": jnp.ones((4, 3))})


def truncated_adult_dir(tmp):
    raw = gzip.compress(b"x" * 10_000)
    for name in ("adult.data", "adult.test"):
        (tmp / f"{name}.gz").write_bytes(raw[: len(raw) // 3])
    tabular.load_adult(tmp)


def truncated_embedded_adult(tmp):
    files = tmp / "_files"
    files.mkdir()
    src = os.path.join(os.path.dirname(tabular.__file__), "_files")
    for name in ("adult.data.gz", "adult.test.gz"):
        raw = open(os.path.join(src, name), "rb").read()
        (files / name).write_bytes(raw[: len(raw) // 2])
    real = tabular.importlib.resources.files
    tabular.importlib.resources.files = lambda pkg: tmp
    try:
        tabular.load_adult()
    finally:
        tabular.importlib.resources.files = real


def write_signed_results(tmp, signature):
    path = tmp / "results.json"
    common.write_json(str(path), {"signature": signature, "rows": []})
    return str(path)


def a_file(tmp):
    (tmp / "file").write_text("x")
    return str(tmp / "file")


def out_is(fn):
    """Driver case whose ``--out`` is computed from tmp."""

    def run(tmp):
        return cli("soft_weighted", "--preset", "smoke", "--out", fn(tmp))(tmp)

    return run


ONE_SET = {"train": {"x": X, "y": Y}}
W_FORGET = {"x": X, "y": Y, "weight": -np.ones(12, np.float32)}

CASES = [
    # --- labels out of range (checked against the model's outputs, before compiling)
    ("train: binary labels -1", lambda t: fit({"train": {"x": X, "y": Y - 1}}),
     ValueError, r"train set's 'y' has labels in \[-1, 0\].*classes \[0, 2\)"),
    ("train: binary labels 5", lambda t: fit({"train": {"x": X, "y": Y + 5}}),
     ValueError, r"labels in \[5, 6\].*\[0, 2\)"),
    ("train: 3-class labels 3", lambda t: fit({"train": {"x": X, "y": Y * 3}}, k=3),
     ValueError, r"labels in \[0, 3\].*\[0, 3\)"),
    ("retrain: retain labels out of range",
     lambda t: fit({"retain": {"x": X, "y": Y + 2}}, method=methods.retrain(lr()[0].apply, optax.sgd(0.1))),
     ValueError, r"retain set's 'y'"),
    ("GA: forget labels out of range",
     lambda t: fit({"forget": {**W_FORGET, "y": Y - 3}},
                   method=methods.gradient_ascent(lr()[0].apply, optimizer=optax.sgd(0.1))),
     ValueError, r"forget set's 'y'"),
    ("evaluate: labels y + 7", lambda t: evaluation.evaluate(lr()[0].apply, lr()[1], {"x": X, "y": Y + 7}),
     ValueError, r"labels in \[7, 8\].*outside the model's classes"),
    ("influence: training labels -1", lambda t: influence({"x": X, "y": Y - 1}),
     ValueError, r"training batch's 'y' has labels in \[-1, 0\]"),
    ("influence: measurement labels 3", lambda t: influence({"x": X, "y": Y}, {"x": X, "y": Y + 3}),
     ValueError, r"measurement 'u'.*labels in \[3, 4\]"),
    ("influence (autodiff): training labels 4",
     lambda t: scores.make_problem(scores.model_loss(lr()[0].apply), lr()[1]["params"],
                                   {"x": X, "y": Y + 4}),
     ValueError, r"training batch's 'y' has labels in \[4, 5\]"),
    ("refit_head: labels 2 for one logit",
     lambda t: last_layer.refit_head(jnp.asarray(X), jnp.asarray(Y + 2), l2=0.1),
     ValueError, r"labels in \[2, 3\]"),
    # --- sets, weights and loop arguments
    ("train: NaN features", lambda t: fit({"train": {"x": np.where(X > 1, np.nan, X), "y": Y}}),
     ValueError, r"train set's features contain NaN"),
    ("forget set without weights",
     lambda t: fit({"forget": {"x": X, "y": Y}},
                   method=methods.gradient_ascent(lr()[0].apply, optimizer=optax.sgd(0.1))),
     ValueError, r"forget set has no 'weight'.*unlearning_sets"),
    ("forget set all weight 0",
     lambda t: fit({"forget": {**W_FORGET, "weight": np.zeros(12)}},
                   method=methods.gradient_ascent(lr()[0].apply, optimizer=optax.sgd(0.1))),
     ValueError, r"forget set has weight 0: the forget set is empty"),
    ("retain weights NaN", lambda t: fit({"train": {"x": X, "y": Y, "weight": np.full(12, np.nan)}}),
     ValueError, r"train set's weight contains NaN"),
    ("weights of the wrong length", lambda t: fit({"train": {"x": X, "y": Y, "weight": np.ones(5)}}),
     ValueError, r"weight has shape \(5,\), but the set has 12 samples"),
    ("epochs=0", lambda t: fit(ONE_SET, epochs=0), ValueError, r"epochs must be >= 1, got 0"),
    ("no batch size", lambda t: fit(ONE_SET, batch_size=None), ValueError, r"no batch size for the train set"),
    ("negative batch size", lambda t: fit(ONE_SET, batch_size=-2), ValueError,
     r"train batch size must be positive, got -2"),
    ("a set the method reads is missing", lambda t: fit({"retain": {"x": X, "y": Y}}), ValueError,
     r"reads the 'train' set; sets has \['retain'\]"),
    ("sets not a dict", lambda t: fit([X, Y]), ValueError, r"sets must be a dict of named splits"),
    ("sampling of the wrong length", lambda t: fit(ONE_SET, sampling=np.ones(3)), ValueError,
     r"sampling has shape \(3,\), the train set has 12"),
    ("compile a non-method", lambda t: loop.compile(lambda p: p), ValueError,
     r"expected a jaxunlearn.methods.Method"),
    ("train l2 < 0", lambda t: methods.train(lr()[0].apply, optax.sgd(0.1), l2=-1.0), ValueError,
     r"l2 must be >= 0, got -1"),
    ("optimizer not optax", lambda t: methods.train(lr()[0].apply, "adam"), ValueError,
     r"optimizer must be an optax.GradientTransformation, got str"),
    ("evaluating an empty split", lambda t: evaluation.evaluate(lr()[0].apply, lr()[1],
                                                                {"x": X, "y": Y, "weight": np.zeros(12)}),
     ValueError, r"evaluated split \(e.g. an empty forget or retain set\) has weight 0"),
    ("batch plan of an empty forget set",
     lambda t: batching.batch_plan(12, 4, weight=np.zeros(12), name="the forget set"),
     ValueError, r"every sample of the forget set has weight 0: the forget set is empty"),
    ("unlearning_sets: empty forget set", lambda t: weights.unlearning_sets({"x": X, "y": Y}, np.zeros(12)),
     ValueError, r"forget set is empty"),
    # --- influence
    ("influence: solver given as a string",
     lambda t: influence({"x": X, "y": Y}, solver="cg"), ValueError, r"solver must be a solver object"),
    ("LiSSA depth=0", lambda t: solvers.LiSSA(depth=0), ValueError, r"depth"),
    ("LiSSA scale too small: names scale, not maxiter",
     lambda t: influence({"x": X * 10, "y": Y}, solver=solvers.LiSSA(scale=1e-3)),
     solvers.DivergenceError, r"(?s)LiSSA diverged.*larger LiSSA\(scale=\.\.\.\)(?!.*maxiter)"),
    ("LiSSA depth too small: names depth, not maxiter",
     lambda t: influence({"x": X, "y": Y}, solver=solvers.LiSSA(depth=2)), solvers.NonConvergenceError,
     r"(?s)more than depth=2: raise depth, or add damping(?!.*maxiter)"),
    ("DP measurement with a group absent",
     lambda t: scores.influence_scores(
         last_layer.make_problem(head(), {"x": X, "y": Y}, l2=0.1),
         {"dp": (measurements.demographic_parity(last_layer.head_apply), {"x": X, "y": Y, "group": 0 * G})}),
     ValueError, r"group group=1, which has no sample"),
    ("signed DP with three groups",
     lambda t: measurements.demographic_parity(last_layer.head_apply, num_groups=3), ValueError,
     r"needs exactly two groups.*aggregate='range'"),
    # --- checkpoints and data files
    ("every checkpoint corrupt", restore_all_corrupt, checkpoint.CheckpointCorruptError,
     r"no readable checkpoint in .*ck.*--fresh"),
    ("checkpoint of another model", restore_other_model, checkpoint.CheckpointMismatchError,
     r"does not match the model: leaf \['b'\] is float32\[3, 3\] on disk but float32\[4, 3\]"),
    ("truncated adult.data.gz in data_dir", truncated_adult_dir, tabular.DataError,
     r"adult.data.gz is corrupt \(truncated.*download adult.data again"),
    ("truncated embedded adult.data.gz", truncated_embedded_adult, tabular.DataError,
     r"_files/adult.data.gz is corrupt.*reinstall jaxunlearn"),
    ("resume from another config's results.json",
     lambda t: common.resume_rows(write_signed_results(t, {"seed": 1}), {"seed": 2}), ValueError,
     r"other settings \(seed\); pass --fresh"),
    ("resume from a garbled results.json",
     lambda t: (t / "results.json").write_text("{") and common.resume_rows(str(t / "results.json"), {}),
     ValueError, r"cannot resume from .*results.json.*--fresh"),
    # --- drivers: refused before any compute
    ("--out under /proc", cli("soft_weighted", "--preset", "smoke", "--out", "/proc/x"), UsageError,
     r"--out '/proc/x' is not a writable directory"),
    ("--out is a file", out_is(a_file), UsageError, r"--out '.*file' is not a writable directory"),
    ("--out below a file", out_is(lambda t: os.path.join(a_file(t), "sub")), UsageError,
     r"--out '.*file/sub' is not a writable directory"),
    ("--seeds 0", cli("soft_weighted", "--preset", "smoke", "--seeds", "0"), UsageError,
     r"argument --seeds: '0' is not an integer >= 1"),
    ("soft_weighted seeds=0", cli("soft_weighted", "--preset", "smoke", "--set", "seeds=0"), UsageError,
     r"config seeds=0 must be an integer in \[1, inf\)"),
    ("soft_weighted unlearn_lr=nan", cli("soft_weighted", "--preset", "smoke", "--set", "unlearn_lr=nan"),
     UsageError, r"config unlearn_lr is NaN or inf"),
    ("soft_weighted hard fraction 1.5",
     cli("soft_weighted", "--preset", "smoke", "--set", "hard_fractions=0.5,1.5"), UsageError,
     r"config hard_fractions\[1\]=1.5 must be a finite number in \(0, 1\]"),
    ("soft_weighted unknown algorithm",
     cli("soft_weighted", "--preset", "smoke", "--set", "algorithms=GA_FT,Foo"), UsageError,
     r"config algorithms=.*unknown \['Foo'\]"),
    ("soft_weighted unknown task", cli("soft_weighted", "--preset", "smoke", "--set", "tasks=dp,xyz"),
     UsageError, r"config tasks=.*unknown \['xyz'\]"),
    ("soft_weighted seeds='abc'", cli("soft_weighted", "--preset", "smoke", "--set", "seeds=abc"),
     UsageError, r"config seeds='abc' should be like its default"),
    ("unknown --set key", cli("soft_weighted", "--preset", "smoke", "--set", "sedes=2"), UsageError,
     r"--set sedes=...: unknown key"),
    ("unknown preset", cli("soft_weighted", "--preset", "nope"), UsageError, r"unknown preset 'nope'"),
    ("fairness_gap penalty_strength=nan",
     cli("fairness_gap", "--preset", "smoke", "--set", "penalty_strength=nan"), UsageError,
     r"config penalty_strength is NaN or inf"),
    ("fairness_gap penalty_strength=-1",
     cli("fairness_gap", "--preset", "smoke", "--set", "penalty_strength=-1"), UsageError,
     r"config penalty_strength=-1.0 must be a finite number in \[0, inf\)"),
    ("fairness_gap unknown method", cli("fairness_gap", "--preset", "smoke", "--set", "methods=GA,Nope"),
     UsageError, r"config methods: unknown \['Nope'\]"),
    ("fairness_gap eps=2", cli("fairness_gap", "--preset", "smoke", "--set", "eps=2.0"), UsageError,
     r"attack eps=2.0 is outside the input range"),
    ("group_robust ratio 0", cli("group_robust", "--preset", "tiny", "--set", "ratios=0,0.5"), UsageError,
     r"forget ratio 0.0 is outside \(0, 1\]"),
    ("group_robust unknown method", cli("group_robust", "--preset", "tiny", "--set", "methods=foo,"),
     UsageError, r"config methods: unknown \['foo'\]"),
    ("train_baselines unknown model", cli("train_baselines", "--preset", "quick", "--set", "models=nope,"),
     UsageError, r"config models: unknown \['nope'\]"),
    ("train_baselines negative lr",
     cli("train_baselines", "--preset", "quick", "--set",
         "recipes={'a': {'dataset': 'adult', 'model': 'lr', 'lr': -1.0, 'epochs': 1, "
         "'batch_size': 8, 'l2': 0.0}}"),
     UsageError, r"config recipes\['a'\]\['lr'\]=-1.0 must be a finite number in \(0, inf\)"),
    ("influence_validity num_points=0",
     cli("influence_validity", "--preset", "quick", "--set", "num_points=0"), UsageError,
     r"config num_points=0 must be an integer in \[1, inf\)"),
    ("influence_validity gamma=inf", cli("influence_validity", "--preset", "quick", "--set", "gamma=inf"),
     UsageError, r"config gamma is NaN or inf"),
]


def test_the_catalogue_is_large_and_distinct():
    names = [c[0] for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)


@pytest.mark.parametrize("name, fn, exc, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(tmp_path)
    # driver cases: nothing was computed, so nothing but the (empty) --out was written
    out = tmp_path / "out"
    if out.exists():
        assert not os.listdir(out), os.listdir(out)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ck, tree = checkpoints(tmp_path, corrupt=(2,))
    with pytest.warns(RuntimeWarning, match=r"checkpoint 2 in .*ck is unreadable.*falling back"):
        step, restored = ck.restore_latest(tree)
    assert step == 1 and ck.metadata(1) == {"epoch": 1}
    np.testing.assert_array_equal(restored["a"], tree["a"])
    ck.save(2, tree, metadata={"epoch": 2})  # the bad step was removed: it can be written again
    assert checkpoint.Checkpointer(tmp_path / "ck").restore_latest(tree)[0] == 2


def test_lissa_defaults_solve_an_ill_conditioned_small_problem():
    """LiSSA() with its defaults on a p = 161 SPD matrix with the spectrum of a converged small MLP
    (condition number ~1.3e4, measured: eigenvalues 7.2e-5 ... 0.92) matches the dense solve."""
    p = 161
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    H = (q * np.geomspace(7.2e-5, 0.92, p)) @ q.T
    b = rng.normal(size=p)
    with jax.enable_x64(True):
        Hj = jnp.asarray(H)
        res = jax.jit(lambda v: solvers.LiSSA().solve(lambda V: Hj @ V, v))(jnp.asarray(b))
        assert bool(res.converged), (float(res.residual), int(res.iterations))
    x = np.linalg.solve(H, b)
    assert np.linalg.norm(np.asarray(res.x) - x) / np.linalg.norm(x) < 1e-3


def test_out_check_is_fast_and_names_out():
    """``python -m experiments.soft_weighted --preset quick --out /proc/x`` (issue 12)."""
    import resource
    import subprocess
    import sys
    import time

    def cpu():
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    r = subprocess.run([sys.executable, "-m", "experiments.soft_weighted", "--preset", "quick", "--out",
                        "/proc/x"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    elapsed, used = time.perf_counter() - t0, cpu() - c0
    assert r.returncode == 2 and "--out '/proc/x' is not a writable directory" in r.stderr
    assert "Traceback" not in r.stderr
    # ~3.3 s of CPU, nearly all of it importing jax and the library (wall time depends on the
    # machine's load); a check after any training would cost minutes
    assert used < 10, used
    print(f"refused in {elapsed:.1f} s wall, {used:.1f} s CPU")


@pytest.mark.parametrize("driver", ["soft_weighted", "fairness_gap", "group_robust", "train_baselines",
                                    "influence_validity"])
def test_every_preset_passes_its_drivers_validation(driver):
    """The checks refuse bad configs only: every shipped preset is accepted."""
    import importlib

    mod = importlib.import_module(f"experiments.{driver}")
    for preset in common.presets(driver):
        common.check_config(common.load_config(common.config_path(driver, preset), mod.Config),
                            mod.validate)
