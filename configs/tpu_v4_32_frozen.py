"""TPU v4-32 pod slice: Florence-2-large on DocVQA with the vision tower frozen.

``tpu_v4_32.py`` (same mesh, batch and remat) with the DaViT tower frozen: the optimizer masks its
parameters and the step computes no gradient for it. libtpu compiles it at 4.92 GiB per chip
(docs/scale-out.md), so it fits a v4 chip's 32 GiB with room to spare. Check before renting:
    python -m scripts.aot_compile --config tpu_v4_32_frozen.py --topology v4:2x2x4
"""

import dataclasses

from configs import tpu_v4_32
from train.config import OptimConfig


def get_config():
    cfg = tpu_v4_32.get_config()
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, freeze=OptimConfig().freeze))
