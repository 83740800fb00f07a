"""Peer runner: kronfluence 1.0.1, EK-FAC on the same layers (the head for A, all three Linear layers for B).

Runs inside ``.peers/kronfluence``. The training loss is summed over the batch (kronfluence's
convention) and the true Fisher is sampled from the model (``sample=True``, kronfluence's default).
Its damping is the absolute ``damping_factor = hess_shift`` (our H has ``+ hess_shift * I``).
Workload R: the ResNet-18 of workload R ported to torch (``peer_common.torch_resnet``; its conv and
Linear layers tracked, BatchNorm fixed), as B. Workloads B and R add ``compute_self_scores``.
Workload A: one ``compute_pairwise_scores`` call per measurement with ``aggregate_query_gradients``
(the measurement is a sum over the validation set, so its gradient is the summed query gradient),
and ``compute_self_scores``. Workload B: pairwise scores of the 500 per-query losses. kronfluence's
scores are ``grad m^T (F + damping)^{-1} grad l_i``; divided by n for the benchmark convention.
Factors and scores are written to a temporary directory (kronfluence always goes through disk).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(os.cpu_count() or 1)

import kronfluence  # noqa: E402
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

BATCH = 1024


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


class ClassificationTask(Task):
    """Summed CE training loss; the measurement is ``sum_j coef_j f_j`` with f = CE or p(class 1)."""

    def __init__(self):
        self.kind = "ce"

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch[0], batch[1]
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch[0], batch[1]
        logits = model(x)
        coef = batch[2] if len(batch) > 2 else torch.ones(x.shape[0])
        if self.kind == "ce":
            return (coef * F.cross_entropy(logits, y, reduction="none")).sum()
        return (coef * torch.softmax(logits, -1)[:, 1]).sum()


def make_analyzer(model, task, out_dir):
    model = prepare_model(model, task)
    return Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                    log_level=logging.ERROR, output_dir=out_dir)


def fit(analyzer, train):
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=BATCH,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)


def run_a(data, methods, repeats):
    if methods != ["ekfac"]:
        raise ValueError(f"kronfluence runs method 'ekfac' only, got {methods}")
    W = t(data["W"])
    X, y = t(data["X"]), t(data["y"]).long()
    n, (k, d) = X.shape[0], W.shape
    shift = float(data["hess_shift"])
    train = TensorDataset(X, y)
    meas = [(name, TensorDataset(t(xm), t(ym).long(), t(c)), kind)
            for name, xm, ym, c, kind in pc.head_measurement_specs(data)]

    def run(timer):
        model = torch.nn.Sequential(torch.nn.Linear(d, k, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(W)
        model.eval()
        task = ClassificationTask()
        with tempfile.TemporaryDirectory() as out_dir:
            analyzer = make_analyzer(model, task, out_dir)
            with timer.stage("factor"):
                fit(analyzer, train)
            rows = []
            with timer.stage("scores"):
                for name, qset, kind in meas:
                    task.kind = kind
                    analyzer.compute_pairwise_scores(
                        scores_name=f"s_{name}", factors_name="ekfac", query_dataset=qset, train_dataset=train,
                        per_device_query_batch_size=len(qset), per_device_train_batch_size=BATCH,
                        score_args=ScoreArguments(damping_factor=shift, aggregate_query_gradients=True),
                        overwrite_output_dir=True)
                    rows.append(analyzer.load_pairwise_scores(f"s_{name}")["all_modules"][0])
            with timer.stage("self_influence"):
                analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=train,
                                             per_device_train_batch_size=BATCH,
                                             score_args=ScoreArguments(damping_factor=shift),
                                             overwrite_output_dir=True)
                s = analyzer.load_self_scores("self")["all_modules"]
        return torch.stack(rows) / n, s / n, {}

    stages, (S, s, info) = pc.run_repeats(run, repeats)
    return {"ekfac": {"stages": stages, **info}}, {"ekfac__scores": S.numpy(), "ekfac__self": s.numpy()}


def run_network(data, methods, repeats, make_model):
    """Workloads B and R: pairwise scores of the per-query CE losses and self-influence."""
    if methods != ["ekfac"]:
        raise ValueError(f"kronfluence runs method 'ekfac' only, got {methods}")
    X, y = t(data["X"]), t(data["y"]).long()
    Xq, yq = t(data["Xq"]), t(data["yq"]).long()
    n = X.shape[0]
    shift = float(data["hess_shift"])
    train, query = TensorDataset(X, y), TensorDataset(Xq, yq)
    check = {}
    if "logits_q" in data:   # the torch port must reproduce the Flax model
        with torch.no_grad():
            check["port_max_abs_logit_diff"] = float((make_model()(Xq) - t(data["logits_q"])).abs().max())

    def run(timer):
        model = make_model()
        with tempfile.TemporaryDirectory() as out_dir:
            analyzer = make_analyzer(model, ClassificationTask(), out_dir)
            with timer.stage("factor"):
                fit(analyzer, train)
            with timer.stage("scores"):
                analyzer.compute_pairwise_scores(
                    scores_name="pairwise", factors_name="ekfac", query_dataset=query, train_dataset=train,
                    per_device_query_batch_size=len(query), per_device_train_batch_size=BATCH,
                    score_args=ScoreArguments(damping_factor=shift), overwrite_output_dir=True)
                S = analyzer.load_pairwise_scores("pairwise")["all_modules"]
            with timer.stage("self_influence"):
                analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=train,
                                             per_device_train_batch_size=BATCH,
                                             score_args=ScoreArguments(damping_factor=shift),
                                             overwrite_output_dir=True)
                s = analyzer.load_self_scores("self")["all_modules"]
        return S / n, s / n, {}

    stages, (S, s, info) = pc.run_repeats(run, repeats)
    return ({"ekfac": {"stages": stages, **info, **check}},
            {"ekfac__scores": S.numpy(), "ekfac__self": s.numpy()})


def main():
    args = pc.parse_args()
    data = pc.load(args.data)
    methods = (args.methods or "ekfac").split(",")
    if args.workload == "A":
        results, scores = run_a(data, methods, args.repeats)
    elif args.workload == "B":
        results, scores = run_network(data, methods, args.repeats, lambda: pc.torch_mlp(data))
    else:
        results, scores = run_network(data, methods, args.repeats, lambda: pc.torch_resnet(data))
    pc.emit("kronfluence", kronfluence.__version__, results, scores, args.scores,
            threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
