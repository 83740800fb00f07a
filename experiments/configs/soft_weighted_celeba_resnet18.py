"""soft_weighted, celeba-resnet18: TFDS CelebA at 64 px, a ResNet-18 body, DP and EOP (accelerator)."""


def get_config():
    return dict(datasets=("celeb_a",), models=("nn",), tasks=("dp", "eop"), seeds=5, nn_epochs=10,
                unlearn_epochs=30, backbone="resnet18", image_size=64, batch_size=256,
                input="stream")
