"""soft_weighted, quick: Adult, LR and NN, the three tasks, two seeds (CPU, minutes)."""


def get_config():
    return dict(datasets=("adult",), models=("lr", "nn"), tasks=("dp", "eop", "robust"), seeds=2,
                nn_epochs=6, unlearn_epochs=5, batch_size=512)
