"""Helpers shared by every benchmark runner (jaxunlearn's and the peers'); numpy and stdlib only
(:func:`torch_mlp`, for the torch-based peers, imports torch when called).

Each runner is a script run by ``influence_bench`` in its own interpreter (a peer virtualenv, or
the project's venv for jaxunlearn):

    python RUNNER.py --workload A --data A.npz --repeats 3 --scores OUT.npz [--methods a,b]

It times each method ``repeats`` times end to end (stage by stage, plus the end-to-end ``total``),
writes its scores to ``--scores`` (``{method}__scores`` [m, n] and ``{method}__self`` [n]), already
converted to the benchmark convention (``score_i = (1/n) grad m^T H^{-1} grad l_i``), and prints one
JSON line ``{"library", "version", "methods": {name: {"stages": {stage: [seconds...]}, ...}}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

# Stages that form a method's pipeline; "total" is measured end to end around them.
STAGES_A = ("per_sample_grads", "measure_grads", "hessian", "factor", "solve", "scores", "self_influence")
STAGES_B = ("query_grads", "per_sample_grads", "factor", "solve", "scores")
# Informative stages, timed outside the pipeline (not part of "total").
EXTRA_STAGES = ("hvp",)

# Solver settings every library is given (influence_bench reports them).
# stop when ||H x - b|| <= CG_RTOL ||b||; influence_bench --cg-rtol sets it for every runner
CG_RTOL = float(os.environ.get("JAXUNLEARN_BENCH_CG_RTOL", "1e-5"))
CG_MAXITER = 1000
ARNOLDI_RANK = 50       # top eigenpairs kept (workload B)
ARNOLDI_KRYLOV = 2 * ARNOLDI_RANK + 1


def parse_args(argv=None, default_methods: str = ""):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["A", "B", "R"], required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scores", required=True, help="where to write the score arrays (.npz)")
    ap.add_argument("--methods", default=default_methods, help="comma-separated subset")
    ap.add_argument("--cg-rows", type=int, default=None,
                    help="workload B: query rows solved by CG (default: the reference rows)")
    return ap.parse_args(argv)


def load(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class Timer:
    """Collects wall-clock seconds per stage for one run; ``sync`` is called before each stop."""

    def __init__(self, sync=None):
        self.times: dict[str, float] = {}
        self.sync = sync or (lambda x: x)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        box = []
        yield box
        for x in box:
            self.sync(x)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def run_repeats(fn, repeats: int, extra=EXTRA_STAGES) -> tuple[dict, dict]:
    """Run ``fn(timer) -> outputs`` ``repeats`` times; returns ({stage: [s, ...]}, last outputs).

    ``total`` is the end-to-end time less the informative ``extra`` stages.
    """
    stages: dict[str, list] = {}
    out = None
    for _ in range(max(repeats, 1)):
        timer = Timer()
        t0 = time.perf_counter()
        out = fn(timer)
        total = time.perf_counter() - t0
        for k, v in timer.times.items():
            stages.setdefault(k, []).append(v)
        stages.setdefault("total", []).append(total - sum(timer.times.get(k, 0.0) for k in extra))
    return stages, out


def emit(library: str, version: str, methods: dict, scores: dict, scores_path: str, **extra) -> None:
    np.savez(scores_path, **{k: np.asarray(v) for k, v in scores.items()})
    print(json.dumps({"library": library, "version": version, "methods": methods, **extra}))
    sys.stdout.flush()


def head_measurement_specs(data: dict):
    """The three workload-A measurements as (name, inputs, labels, per-example coefficient, kind).

    kind "ce": sum_j coef_j CE(W x_j, y_j); kind "p1": sum_j coef_j softmax(W x_j)[1].
    """
    nv = len(data["yv"])
    mean = np.full(nv, 1.0 / nv, np.float32)
    return [
        ("util", data["Xv"], data["yv"], mean, "ce"),
        ("dp", data["Xv"], data["yv"], data["dp_coef"].astype(np.float32), "p1"),
        ("rob", data["Xadv"], data["yv"], mean, "ce"),
    ]


def torch_mlp(data: dict):
    """Workload B's MLP as a ``torch.nn.Sequential`` (Linear/ReLU) holding the stored weights, eval mode."""
    import torch

    nl = sum(1 for key in data if key.startswith("W"))
    layers = []
    for i in range(nl):
        w = data[f"W{i + 1}"]
        layers += [torch.nn.Linear(w.shape[0], w.shape[1])] + ([torch.nn.ReLU()] if i < nl - 1 else [])
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for i in range(nl):
            model[2 * i].weight.copy_(torch.from_numpy(np.ascontiguousarray(data[f"W{i + 1}"].T)))
            model[2 * i].bias.copy_(torch.from_numpy(np.ascontiguousarray(data[f"b{i + 1}"])))
    return model.eval()


def torch_resnet(data: dict):
    """Workload R's Flax ResNet-18 (CIFAR stem, BasicBlocks, eval-mode BatchNorm) as a torch module
    with the stored weights. Convs are ``torch.nn.Conv2d`` preceded by lax's "SAME" padding
    (asymmetric for stride 2), so kronfluence's patches equal jaxunlearn's. Inputs NHWC."""
    import json

    import torch
    import torch.nn.functional as F

    spec = json.loads(str(data["spec"]))
    P = {k[2:]: np.asarray(v) for k, v in data.items() if k.startswith("p/")}

    class SameConv(torch.nn.Module):
        def __init__(self, prefix, stride):
            super().__init__()
            w = P[f"params/{prefix}/kernel"]                       # [kh, kw, cin, cout]
            kh, kw, cin, cout = w.shape
            self.k, self.s = kh, stride
            self.conv = torch.nn.Conv2d(cin, cout, kh, stride=stride, padding=0, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))

        def forward(self, x):
            h = x.shape[-1]
            out = -(-h // self.s)
            tot = max((out - 1) * self.s + self.k - h, 0)
            lo = tot // 2
            return self.conv(F.pad(x, (lo, tot - lo, lo, tot - lo)))

    def bn(prefix):
        scale = P[f"params/{prefix}/scale"]
        m = torch.nn.BatchNorm2d(scale.shape[0], eps=1e-5)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(scale))
            m.bias.copy_(torch.from_numpy(P[f"params/{prefix}/bias"]))
            m.running_mean.copy_(torch.from_numpy(P[f"batch_stats/{prefix}/mean"]))
            m.running_var.copy_(torch.from_numpy(P[f"batch_stats/{prefix}/var"]))
        return m

    class Block(torch.nn.Module):
        def __init__(self, prefix, stride):
            super().__init__()
            self.conv1, self.bn1 = SameConv(f"{prefix}/conv1", stride), bn(f"{prefix}/bn1")
            self.conv2, self.bn2 = SameConv(f"{prefix}/conv2", 1), bn(f"{prefix}/bn2")
            self.proj = None
            if f"params/{prefix}/proj_conv/kernel" in P:
                self.proj = torch.nn.Sequential(SameConv(f"{prefix}/proj_conv", stride), bn(f"{prefix}/proj_bn"))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu((x if self.proj is None else self.proj(x)) + y)

    class ResNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem_conv, self.stem_bn = SameConv("stem/conv", 1), bn("stem/bn")
            blocks = []
            for s in range(4):
                for b in range(2):
                    blocks.append(Block(f"stage{s + 1}_block{b + 1}", 2 if s > 0 and b == 0 else 1))
            self.blocks = torch.nn.Sequential(*blocks)
            w = P["params/head/kernel"]
            self.head = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                self.head.bias.copy_(torch.from_numpy(P["params/head/bias"]))

        def forward(self, x):
            x = x.permute(0, 3, 1, 2)
            x = torch.relu(self.stem_bn(self.stem_conv(x)))
            x = self.blocks(x)
            return self.head(x.mean(dim=(2, 3)))

    assert spec["width"] > 0
    return ResNet().eval()
