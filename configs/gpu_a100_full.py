"""Full fine-tune (vision tower included) on one A100-40GB at global batch 64: the batch the reference
recipe spread over 8 GPUs, on one card.

``gpu_a100.py`` with every parameter trained. The batch of 64 runs as 8 micro-batches inside one
jitted step (``grad_accum_steps``: one update, the same as for a single batch of 64, the loss a mean over
all its target tokens), and the DaViT blocks and BART layers recompute their activations in the backward
pass (``remat_policy="full"``).

Memory, from ``python -m scripts.aot_compile --config gpu_a100_full.py`` (XLA's CPU compiler, an upper
bound for the GPU's, tracing the GPU's program): 8 micro-batches of 8 need 38.52 GiB (96% of 40 GiB);
4 micro-batches of 16 need 71.45 GiB, which the check cannot guarantee (at 7f1962d, the GPU's vision stages
unrolled; 27.15 and 48.35 GiB with them scanned, 2026-11-28). XLA:GPU's own
compile for an A100-40GB (``--topology a100``, no GPU needed; docs/scale-out.md, 2026-12-07, at 21d7994): 8 x 8
needs 6.2 GiB and 4 x 16 8.6 GiB. ``bash scripts/device_bench.sh`` runs a 4 x 16 step (with the benchmark's shorter
prompts) inside a 40 GiB allocator pool on a GPU; where it fits, ``--config.grad_accum_steps=4`` runs the same update with
fewer, larger micro-batches.
"""

import dataclasses

from configs import gpu_a100


def get_config():
    cfg = gpu_a100.get_config()
    return dataclasses.replace(
        cfg, batch_size=64, grad_accum_steps=8,
        model=dataclasses.replace(cfg.model, remat_policy="full"),
        optim=dataclasses.replace(cfg.optim, freeze=()),
    )
