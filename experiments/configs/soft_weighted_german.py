"""soft_weighted, german: UCI German credit (1,000 rows, sensitive = sex; not in the paper)."""


def get_config():
    return dict(datasets=("german",), seeds=5, nn_epochs=20, unlearn_epochs=30, batch_size=64)
