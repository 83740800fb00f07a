"""group_robust, quick (default): Adult and digits with a spurious frame cue, MLPs (CPU, minutes).

Adult: target income > 50K, sensitive sex, forget cell = high-income women. Digits: forget cell =
digit 9 without frame (a minority cell: odd digits mostly have the frame). The MINE estimators use
Adam 1e-3 (the reference's SGD 0.01 / momentum 0.9 diverged on these features).
"""

MIU = dict(lambda_mi=10.0, forget_epochs=5, tune_steps_first=100, tune_steps_epoch=10,
           mine_optimizer=("adam", 1e-3))
ADULT = dict(name="adult", loader="adult", target=1, sensitive=0,
             model=dict(kind="mlp", hidden=(64, 32)),
             train=dict(optimizer="adam", lr=1e-3, epochs=6, batch_size=256, l2=1e-5),
             unlearn=dict(epochs=10, batch_size=256), miu=MIU)
DIGITS = dict(name="digits_spurious", loader="digits_spurious", target=9, sensitive=0,
              model=dict(kind="mlp", hidden=(64, 32)),
              train=dict(optimizer="adam", lr=3e-3, epochs=30, batch_size=64, l2=1e-5),
              unlearn=dict(epochs=10, batch_size=64), miu=MIU)


def get_config():
    return dict(datasets=(ADULT, DIGITS), ratios=(0.1, 0.5, 0.9),
                ablation=dict(dataset="adult", ratio=0.5, mine_steps=500))
