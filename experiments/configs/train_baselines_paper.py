"""train_baselines, paper: the paper's epochs and the paper-scale ResNet-18 / SmallViT widths."""


def get_config():
    return dict(recipes={
        "adult_lr": dict(dataset="adult", model="lr", lr=1e-2, epochs=30, batch_size=256, l2=1e-5),
        "adult_mlp": dict(dataset="adult", model="mlp", lr=1e-3, epochs=30, batch_size=256, l2=1e-5),
        "digits_resnet18": dict(dataset="digits", model="resnet18", width=16, lr=3e-3, epochs=60,
                                batch_size=64, l2=1e-5),
        "digits_vit": dict(dataset="digits", model="vit", lr=1e-3, epochs=100, batch_size=64,
                           l2=1e-5, patch_size=2, depth=4, width=96, heads=4, mlp_dim=192),
    })
