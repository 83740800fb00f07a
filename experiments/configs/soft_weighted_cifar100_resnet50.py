"""soft_weighted, cifar100-resnet50: TFDS CIFAR-100, a ResNet-50 body, robustness (accelerator)."""


def get_config():
    return dict(datasets=("cifar100",), models=("nn",), tasks=("robust",), seeds=5, nn_epochs=30,
                unlearn_epochs=30, backbone="resnet50", batch_size=256,
                input="stream")
