"""soft_weighted, paper: Adult, LR and NN, the three tasks, five seeds, the paper's epochs."""


def get_config():
    return dict(datasets=("adult",), models=("lr", "nn"), tasks=("dp", "eop", "robust"), seeds=5,
                nn_epochs=20, unlearn_epochs=30)
