"""soft_weighted, smoke: 2,000 Adult rows, LR, DP, GA_FT and IF, one epoch (seconds)."""


def get_config():
    return dict(datasets=("adult",), models=("lr",), tasks=("dp",), seeds=1, unlearn_epochs=1,
                max_train=2000, algorithms=("GA_FT", "IF"), hard_fractions=(0.05, 0.1))
