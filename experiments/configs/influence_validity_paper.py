"""influence_validity, paper: 150 leave-one-out retrainings per model, a 20-epoch NN."""


def get_config():
    return dict(num_points=150, nn_hidden=(64, 32), nn_epochs=20, nn_lr=1e-3, nn_l2=1e-5,
                batch_size=256, gamma=1.3)
