"""influence_validity, quick: 40 leave-one-out retrainings per model, a 5-epoch NN."""


def get_config():
    return dict(num_points=40, nn_hidden=(64, 32), nn_epochs=5, nn_lr=1e-3, nn_l2=1e-5,
                batch_size=256, gamma=1.3)
