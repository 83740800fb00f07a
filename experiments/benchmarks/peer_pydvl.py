"""Peer runner: pyDVL 0.10 (``pydvl.influence.torch``: DirectInfluence, CgInfluence, ArnoldiInfluence).

Runs inside ``.peers/pydvl``. pyDVL computes influences of training points on *test losses*; it has
no API for other measurements (DP, a mean over a validation set), so the measurement gradients are
computed with torch.func here (stage ``measure_grads``) and passed to pyDVL's fitted inverse-Hessian
operator (``block.op.apply``) -- the same operator its ``influence_factors`` uses. Scores come from
pyDVL's ``influences_from_factors`` (which computes the per-sample training gradients itself, so its
``scores`` stage includes them; ``per_sample_grads`` is timed separately for reference only).
Self-influence (workload A, direct) is the diagonal of pyDVL's symmetric ``influences(x_chunk,
y_chunk)`` over chunks of 1,000 points (pyDVL 0.10 has no self-influence call).

CG tolerance: pyDVL stops when ``||r|| < max(rtol^2 * .., atol^2)`` with a norm taken across the
batch; to give every library the same criterion (``||r|| <= CG_RTOL ||b||``) each right-hand side
is solved by its own ``apply`` with ``rtol = 0`` and ``atol = sqrt(CG_RTOL ||b||)``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import numpy as np
import torch
from torch.func import grad
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
torch.set_num_threads(os.cpu_count() or 1)

import pydvl  # noqa: E402
from pydvl.influence import InfluenceMode  # noqa: E402
from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence  # noqa: E402
from pydvl.influence.torch.base import TorchBatch  # noqa: E402

HESSIAN_BATCH = 10_000   # batch of pyDVL's dense Hessian (torch.func.hessian per batch)
SELF_CHUNK = 1_000
TRAIN_CHUNK_B = 1_000


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def loss_fn(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets)


def only_block(model):
    blocks = model.block_mapper.composable_block_dict
    (block,) = blocks.values()
    return block


def cg_apply(block, B):
    """Solve each row of B [m, p] with pyDVL's CgOperator, stopping at ||r|| <= CG_RTOL ||b||."""
    op = block.op
    out = []
    for b in B:
        op.rtol, op.atol = 0.0, float(torch.sqrt(pc.CG_RTOL * torch.linalg.norm(b)))
        out.append(op.apply(b[None])[0])
    x = torch.stack(out)
    res = max(float(torch.linalg.norm(op._reg_operator_apply(xi[None])[0] - bi) / torch.linalg.norm(bi))
              for xi, bi in zip(x, B))
    return x, res


def run_a(data, methods, repeats):
    W = t(data["W"])
    X, y = t(data["X"]), t(data["y"]).long()
    n, (k, d) = X.shape[0], W.shape
    shift = float(data["hess_shift"])
    model = torch.nn.Linear(d, k, bias=False)
    with torch.no_grad():
        model.weight.copy_(W)
    model.eval()
    meas = [(name, t(xm), t(ym).long(), t(c), kind) for name, xm, ym, c, kind in pc.head_measurement_specs(data)]

    def measurement(w, xm, ym, c, kind):
        z = xm @ w.T
        if kind == "ce":
            return (c * (torch.logsumexp(z, -1) - z.gather(1, ym[:, None])[:, 0])).sum()
        return (c * torch.softmax(z, -1)[:, 1]).sum()

    def measure_grads():
        w = model.weight.detach()
        return torch.stack([grad(measurement)(w, xm, ym, c, kind).reshape(-1) for _, xm, ym, c, kind in meas])

    def scores(inf, V):
        return inf.influences_from_factors(V, X, y, mode=InfluenceMode.Up) / n

    def psg(inf, timer):
        with timer.stage("per_sample_grads"):
            only_block(inf).gp.flat_grads(TorchBatch(X, y))

    def direct(timer):
        inf = DirectInfluence(model, loss_fn, regularization=shift)
        with timer.stage("hessian"):
            inf.fit(DataLoader(TensorDataset(X, y), batch_size=HESSIAN_BATCH))
        psg(inf, timer)
        with timer.stage("measure_grads"):
            gm = measure_grads()
        with timer.stage("solve"):
            V = only_block(inf).op.apply(gm)
        with timer.stage("scores"):
            S = scores(inf, V)
        with timer.stage("self_influence"):
            s = torch.cat([torch.diagonal(inf.influences(X[lo:lo + SELF_CHUNK], y[lo:lo + SELF_CHUNK]))
                           for lo in range(0, n, SELF_CHUNK)]) / n
        return S, s, {}

    def cg(timer):
        inf = CgInfluence(model, loss_fn, regularization=shift, maxiter=pc.CG_MAXITER)
        with timer.stage("hessian"):  # builds the HVP operator only
            inf.fit(DataLoader(TensorDataset(X, y), batch_size=n))
        psg(inf, timer)
        with timer.stage("measure_grads"):
            gm = measure_grads()
        with timer.stage("hvp"):
            only_block(inf).op.operator.apply(gm[:1])
        with timer.stage("solve"):
            V, res = cg_apply(only_block(inf), gm)
        with timer.stage("scores"):
            S = scores(inf, V)
        return S, None, {"cg_rel_residual": res}

    return run_methods({"direct": direct, "cg": cg}, methods, repeats)


def run_methods(table, methods, repeats):
    results, out = {}, {}
    for name in methods:
        if name not in table:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(table)}")
        stages, (S, s, info) = pc.run_repeats(table[name], repeats, extra=("hvp", "per_sample_grads"))
        results[name] = {"stages": stages, **info}
        out[f"{name}__scores"] = S.detach().numpy()
        if s is not None:
            out[f"{name}__self"] = s.detach().numpy()
    return results, out


def run_b(data, methods, repeats, cg_rows):
    model = pc.torch_mlp(data)
    X, y = t(data["X"]), t(data["y"]).long()
    Xq, yq = t(data["Xq"]), t(data["yq"]).long()
    n = X.shape[0]
    shift = float(data["hess_shift"])
    loader = DataLoader(TensorDataset(X, y), batch_size=n)

    def scores(inf, V):
        return torch.cat([inf.influences_from_factors(V, X[lo:lo + TRAIN_CHUNK_B], y[lo:lo + TRAIN_CHUNK_B],
                                                      mode=InfluenceMode.Up)
                          for lo in range(0, n, TRAIN_CHUNK_B)], dim=1) / n

    def cg(timer):
        inf = CgInfluence(model, loss_fn, regularization=shift, maxiter=pc.CG_MAXITER)
        with timer.stage("factor"):  # builds the HVP operator only
            inf.fit(loader)
        block = only_block(inf)
        with timer.stage("query_grads"):
            gq = block.gp.flat_grads(TorchBatch(Xq[:cg_rows], yq[:cg_rows]))
        with timer.stage("hvp"):
            block.op.operator.apply(gq[:1])
        with timer.stage("solve"):
            V, res = cg_apply(block, gq)
        with timer.stage("scores"):
            S = scores(inf, V)
        return S, None, {"cg_rel_residual": res, "rows": cg_rows}

    def arnoldi(timer):
        inf = ArnoldiInfluence(model, loss_fn, regularization=shift, rank=pc.ARNOLDI_RANK,
                               krylov_dimension=pc.ARNOLDI_KRYLOV, use_woodbury=False)
        with timer.stage("factor"):
            inf.fit(loader)
        with timer.stage("solve"):  # query gradients and their projection
            V = inf.influence_factors(Xq, yq)
        with timer.stage("scores"):
            S = scores(inf, V)
        return S, None, {"rank": pc.ARNOLDI_RANK, "krylov": pc.ARNOLDI_KRYLOV, "eigensolver": "ARPACK eigsh"}

    return run_methods({"cg": cg, "arnoldi": arnoldi}, methods, repeats)


def main():
    args = pc.parse_args()
    data = pc.load(args.data)
    if args.workload == "A":
        results, scores = run_a(data, (args.methods or "direct,cg").split(","), args.repeats)
    else:
        rows = args.cg_rows or int(len(data["ref_rows"]))
        results, scores = run_b(data, (args.methods or "cg,arnoldi").split(","), args.repeats, rows)
    pc.emit("pyDVL", pydvl.__version__, results, scores, args.scores, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
