"""fairness_gap, cifar10-resnet50: paper scale, ResNet-50 on CIFAR-10 (accelerators, --data-dir)."""

from experiments.configs import fairness_gap_quick as quick


def get_config():
    return dict(quick.PAPER, recipes={"resnet50": dict(
        arch="resnet50", width=64, stem="cifar", last_k=4,
        train=dict(optimizer="sgd", lr=0.1, momentum=0.9, epochs=100, batch_size=128, l2=5e-4))})
