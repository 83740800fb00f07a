"""Peer runner: one PyTorch training epoch of the ResNet-18 that ``scaling.py`` times in JAX.

Same network (``jaxunlearn.models.resnet18``, CIFAR stem: 3x3 stride-1 stem conv, BasicBlocks
(2, 2, 2, 2), widths w, 2w, 4w, 8w, bias-free convs, BatchNorm momentum 0.1 in torch's convention
= flax's 0.9, global average pool, linear head), same synthetic data (``np.random.default_rng(0)``:
uniform 32x32x3 images, 10 classes, drawn as in ``scaling.throughput``), same optimiser (SGD lr
0.05, momentum 0.9, L2 5e-4 on all parameters as ``methods.train``'s ``l2``), same batch order
rule (one shuffled pass). Prints one JSON line: the median epoch time over ``--repeats`` epochs
after a warm-up epoch. numpy + torch only (runs in ``.peers/torch``)::

    .peers/torch/bin/python experiments/benchmarks/peer_torch_resnet.py --width 8 --num_samples 256
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                      nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu((x if self.proj is None else self.proj(x)) + y)


class ResNet18(nn.Module):
    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width, eps=1e-5, momentum=0.1), nn.ReLU())
        blocks, cin = [], width
        for s in range(4):
            cout = width * 2 ** s
            for b in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if s > 0 and b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--num_samples", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.num_samples, 32, 32, 3), dtype=np.float32)).permute(0, 3, 1, 2)
    x = x.contiguous()
    y = torch.from_numpy(rng.integers(0, 10, args.num_samples).astype(np.int64))
    model = ResNet18(args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def epoch(seed):
        model.train()
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(args.num_samples))
        t0 = time.perf_counter()
        for i in range(0, args.num_samples, args.batch_size):
            idx = perm[i:i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        float(loss.detach())
        return time.perf_counter() - t0

    epoch(0)  # warm-up
    secs = float(np.median([epoch(r + 1) for r in range(args.repeats)]))
    out = {"torch": torch.__version__, "threads": args.threads, "width": args.width,
           "num_samples": args.num_samples, "batch_size": args.batch_size, "seconds": secs,
           "samples_per_s": args.num_samples / secs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
