"""soft_weighted, bank: UCI Bank Marketing (--data-dir with bank-additional-full.csv), five seeds."""


def get_config():
    return dict(datasets=("bank",), seeds=5, nn_epochs=20, unlearn_epochs=30)
