"""train_baselines, quick: LR and MLP on Adult, CPU-scale ResNet-18 and SmallViT on digits."""


def get_config():
    return dict(recipes={
        "adult_lr": dict(dataset="adult", model="lr", lr=1e-2, epochs=8, batch_size=256, l2=1e-5),
        "adult_mlp": dict(dataset="adult", model="mlp", lr=1e-3, epochs=15, batch_size=256, l2=1e-4),
        "digits_resnet18": dict(dataset="digits", model="resnet18", width=8, lr=3e-3, epochs=25,
                                batch_size=64, l2=1e-5),
        "digits_vit": dict(dataset="digits", model="vit", lr=2e-3, epochs=40, batch_size=64,
                           l2=1e-5, patch_size=2, depth=3, width=64, heads=4, mlp_dim=128),
    })
