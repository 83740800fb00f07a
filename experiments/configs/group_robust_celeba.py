"""group_robust, celeba: CelebA (Blond_Hair / Male; forget blond men) at 64 px (float32 in
memory: 162,770 x 64 x 64 x 3 x 4 B = 8 GB; 224 px would be 98 GB);
ResNet-18 from scratch with the reference's recipes (the reference fine-tunes an
ImageNet-pretrained one); data from --data-dir; accelerators."""


def get_config():
    # Reference pretrain/retrain: SGD lr 0.01, momentum 0.9, wd 1e-4, cosine. Reference MIU: SGD
    # lr 1e-3 (cosine), MINE SGD 0.01 momentum 0.9, lambda_mi 10.
    return dict(datasets=(dict(
        name="celeba", loader="celeb_a", target=1, sensitive=1, size=64, input="stream",
        model=dict(kind="resnet18", width=64),
        train=dict(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4, epochs=30,
                   batch_size=32, l2=0.0),
        unlearn=dict(epochs=10, batch_size=256),
        miu=dict(lambda_mi=10.0, forget_epochs=5, tune_steps_first=100, tune_steps_epoch=10,
                 mine_optimizer=("sgd", 1e-2), model_lr=1e-3, tune_subset=25_600)),))
