"""fairness_gap, cifar10-vit: paper scale, a 6-block SmallViT on CIFAR-10 (accelerators, --data-dir)."""

from experiments.configs import fairness_gap_quick as quick


def get_config():
    return dict(quick.PAPER, recipes={"vit": dict(
        arch="vit", patch_size=4, depth=6, width=192, heads=3, mlp_dim=384, last_k=3,
        train=dict(optimizer="adam", lr=1e-3, epochs=100, batch_size=128, l2=5e-5))})
