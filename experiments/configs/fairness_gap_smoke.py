"""fairness_gap, smoke: a tiny SmallViT on 240 digits, one epoch everywhere (tests)."""

from experiments.configs import fairness_gap_quick as quick


def get_config():
    hparams = {k: dict(v, epochs=1) for k, v in quick.HPARAMS.items()}
    hparams["SCRUB"]["max_epochs"] = 1
    return dict(dataset="digits", max_train=240, forget_class=3, hparams=hparams,
                recipes={"vit": dict(arch="vit", patch_size=4, depth=1, width=8, heads=2,
                                     mlp_dim=16, last_k=1,
                                     train=dict(optimizer="adam", lr=3e-3, epochs=1, batch_size=64,
                                                l2=0.0))},
                unlearn_epochs=1, unlearn_batch_size=64, eps=8 / 255,
                eps_note="8/255 on [0, 1] pixels", pgd_steps=1, memory_analysis=())
