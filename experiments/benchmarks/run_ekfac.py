"""Benchmark runner: jaxunlearn's EK-FAC (:mod:`jaxunlearn.influence.ekfac`) on workloads B and R.

Same interface and output as the peer runners (see ``peer_common``), method ``ekfac``. Stages:
``factor`` (covariance factors, eigendecompositions, eigenvalue correction: two passes over the
training data with labels sampled from the model, as kronfluence), ``scores`` (query gradients,
preconditioning, streamed training gradients contracted with the preconditioned queries: the
[n_query, n] matrix), ``self_influence`` ([n]). ``total`` = factor + scores + self_influence,
the same three stages as the kronfluence runner. Compilation happens in an untimed first run
(its wall time minus the median is reported as ``compile``). Damping = the workload's
``hess_shift`` (absolute, as kronfluence's ``damping_factor``); scores divided by n.
All calls to the influence API are in :func:`ekfac_pipeline`.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.benchmarks import workloads  # noqa: E402

CHUNK = 1024   # training rows per jitted call (kronfluence runner: BATCH = 1024)
# method -> ekfac.fit(fisher=): "ekfac" = kronfluence's setting (one sampled label per sample and
# pass); "ekfac_exact" = the same Fisher with the label expectation in closed form (K backward passes)
FISHER = {"ekfac": "sampled", "ekfac_exact": "exact"}


def ekfac_pipeline(timer, apply, variables, layers, train, query, damping, key, fisher="sampled"):
    """The only place that calls the influence API: fit EK-FAC, pairwise scores, self-influence."""
    from jaxunlearn.influence import ekfac

    timer.sync = jax.block_until_ready     # each stage ends when its arrays are ready
    with timer.stage("factor") as box:
        fac = ekfac.fit(apply, variables, train, key if fisher == "sampled" else None, layers=layers,
                        fisher=fisher, chunk_size=CHUNK)
        box.append(fac)
    with timer.stage("scores") as box:
        S = ekfac.pairwise_scores(apply, variables, fac, query, train, layers=layers, damping=damping,
                                  chunk_size=CHUNK)
        box.append(S)
    with timer.stage("self_influence") as box:
        s = ekfac.self_scores(apply, variables, fac, train, layers=layers, damping=damping, chunk_size=CHUNK)
        box.append(s)
    return S, s




def model_for(workload, data):
    if workload == "B":
        from jaxunlearn.models import mlp

        nl = sum(1 for key in data if key.startswith("W"))
        hidden = tuple(int(data[f"W{i + 1}"].shape[1]) for i in range(nl - 1))
        model = mlp(int(data["W1"].shape[0]), int(data[f"W{nl}"].shape[1]), hidden=hidden)
        names = [f"dense_{i}" for i in range(nl - 1)] + ["head"]
        params = {nm: {"kernel": jnp.asarray(data[f"W{i + 1}"]), "bias": jnp.asarray(data[f"b{i + 1}"])}
                  for i, nm in enumerate(names)}
        return model, {"params": params}
    import json

    model = workloads.r_model(json.loads(str(data["spec"])))
    variables = jax.tree_util.tree_map(jnp.asarray, workloads.load_r_variables(data))
    return model, variables


def analytic_flops(apply, variables, layers, x, n, nq):
    """Stage FLOPs from the layer shapes (the same count for every library):
    forward per sample F = sum_l 2 T_l d_in d_out (T_l output positions); backward to the layer
    outputs ~ F; factor = n (2 passes x 2F + sum_l 2 T_l (d_in^2 + d_out^2) + 2 T_l d_in d_out);
    scores = (n + nq) 2F + 2 nq n P; self_influence = n (2F + 2 P)."""
    from jaxunlearn.influence import ekfac

    got = {}

    def fwd(v, x_):
        _, inputs, _, outputs = ekfac._forward(apply, v, x_, None, record_outputs=True)
        got.update({k: o.shape for k, o in outputs.items()})
        return 0

    jax.eval_shape(fwd, variables, x[:1])
    T = {l.name: math.prod(got[l.name][1:-1]) for l in layers}
    F = sum(2 * T[l.name] * l.d_in * l.d_out for l in layers)
    P = sum(l.d_in * l.d_out for l in layers)
    factor = n * (4 * F + sum(2 * T[l.name] * (l.d_in ** 2 + l.d_out ** 2 + l.d_in * l.d_out) for l in layers))
    return {"factor": factor, "scores": (n + nq) * 2 * F + 2 * nq * n * P, "self_influence": n * (2 * F + 2 * P),
            "num_params_blocks": P}


def main():
    args = pc.parse_args(default_methods="ekfac")
    methods = args.methods.split(",")
    if args.workload not in ("B", "R") or not set(methods) <= set(FISHER):
        raise SystemExit(f"run_ekfac: workload B or R, methods from {sorted(FISHER)}")
    data = pc.load(args.data)
    model, variables = model_for(args.workload, data)
    X, y = jnp.asarray(data["X"]), jnp.asarray(data["y"])
    train = {"x": X, "y": y}
    query = {"x": jnp.asarray(data["Xq"]), "y": jnp.asarray(data["yq"])}
    n = X.shape[0]
    damping = float(data["hess_shift"])
    from jaxunlearn.influence import ekfac

    layers = ekfac.find_layers(model.apply, variables, X[:2])
    flops = analytic_flops(model.apply, variables, layers, X, n, query["x"].shape[0])
    key = jax.random.key(0)

    infos, arrays = {}, {}
    for method in methods:
        run = lambda tm: ekfac_pipeline(tm, model.apply, variables, layers, train, query, damping, key,
                                        fisher=FISHER[method])
        t0 = time.perf_counter()
        run(pc.Timer())   # compile
        first = time.perf_counter() - t0
        stages, (S, s) = pc.run_repeats(run, args.repeats)
        infos[method] = {"stages": stages, "compile": {"all": max(first - float(np.median(stages["total"])), 0.0)},
                         "flops": flops, "layers": len(layers), "fisher": FISHER[method]}
        arrays.update({f"{method}__scores": np.asarray(S) / n, f"{method}__self": np.asarray(s) / n})
    pc.emit("jaxunlearn", "ekfac", infos, arrays, args.scores)


if __name__ == "__main__":
    main()
