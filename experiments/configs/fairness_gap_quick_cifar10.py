"""fairness_gap, quick-cifar10: the quick study on a 2,000-example CIFAR-10 subset (--data-dir)."""

from experiments.configs import fairness_gap_quick as quick


def get_config():
    return dict(quick.get_config(), dataset="cifar10", input="stream", max_examples=2000,
                eps_note="8/255 on [0, 1] pixels",
                recipes={"resnet18": quick.RESNET18, "vit": dict(quick.VIT, patch_size=4)})
