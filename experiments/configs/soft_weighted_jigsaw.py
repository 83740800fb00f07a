"""soft_weighted, jigsaw: TFDS civil_comments (--data-dir), five seeds."""


def get_config():
    return dict(datasets=("civil_comments",), seeds=5, nn_epochs=10, unlearn_epochs=30)
