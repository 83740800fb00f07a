"""group_robust, tiny: the quick digits study cut to seconds (tests)."""


def get_config():
    miu = dict(lambda_mi=10.0, forget_epochs=1, tune_steps_first=5, tune_steps_epoch=2,
               mine_optimizer=("adam", 1e-3), mine_hidden=16)
    digits = dict(name="digits_spurious", loader="digits_spurious", target=9, sensitive=0,
                  model=dict(kind="mlp", hidden=(64, 32)),
                  train=dict(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, l2=1e-5),
                  unlearn=dict(epochs=2, batch_size=64), miu=miu)
    return dict(datasets=(digits,), ratios=(0.5,), methods=("rw_retrain", "miu"))
