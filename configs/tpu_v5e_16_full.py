"""TPU v5e-16 pod slice: Florence-2-base full fine-tune (vision tower trained too) on DocVQA.

``tpu_v5e_16.py`` with every parameter trained. Training the tower keeps its activations for the backward
pass: at 16 examples per chip without rematerialisation libtpu asks for 54 GiB of temporaries per chip
(v5e has 16), so this config rematerialises every block and halves the batch (8 per chip, 32 per host):
libtpu then compiles it at 5.8 GiB per chip (docs/scale-out.md). Check it fits before renting:
    python -m scripts.aot_compile --config tpu_v5e_16_full.py --topology v5e:4x4
"""

import dataclasses

from configs import tpu_v5e_16


def get_config():
    cfg = tpu_v5e_16.get_config()
    return dataclasses.replace(
        cfg,
        batch_size=128,
        model=dataclasses.replace(cfg.model, remat_policy="full"),
        optim=dataclasses.replace(cfg.optim, freeze=()),
        eval=dataclasses.replace(cfg.eval, batch_size=128),
    )
