"""DocVQA with LoRA on one A100-40GB: Florence-2-base-ft, adapters on BART's attention and MLPs, bf16.

The reference recipe (gpu_a100.py) with low-rank adapters instead of full fine-tuning: rank 16, alpha 32
(scale 2), no adapter dropout, on every attention projection (encoder self-attention, decoder self- and
cross-attention) and both MLP linears of the language model; the vision tower stays frozen (no adapters,
gradients stopped at its output), as do all base weights. Adapters start at B = 0, so step 0 is the
base model. With 3.2M trainable parameters instead of 230M, LoRA takes a learning rate about 100x that of
full fine-tuning: 1e-4 with a short warmup, linear decay, 3 epochs. Optimizer moments exist only for the
adapters. The run exports both the merged model (export/, loads in transformers as is) and a peft adapter
(export/adapter/, ``PeftModel.from_pretrained(base, dir)``). Add the vision tower's attention with
``--config.lora.targets`` plus a pattern such as ``window_attn\\.qkv$`` and ``--config.optim.freeze=()``.

Memory (``python -m scripts.aot_compile --config gpu_a100_lora.py``, the CPU compiler's upper bound, batch
32): 25.1 GiB per device at 7f1962d, fits 40 GiB (gpu_a100.py without adapters: 26.9 GiB; 33.9 and 35.7 with
the vision stages scanned, before 7f1962d). Adapter dropout 0.05 raised the scanned figure to
43.5 GiB (each adapted layer keeps a dropped copy of its input for the backward pass), which does not fit:
with dropout, lower the batch or raise ``grad_accum_steps``. XLA:GPU's own compile for an A100-40GB
(``--topology a100``; docs/scale-out.md, 2026-12-07, at 21d7994): 7.1 GiB without adapter dropout.
"""

import dataclasses

from configs import gpu_a100
from train.config import LoRAConfig


def get_config():
    cfg = gpu_a100.get_config()
    return dataclasses.replace(
        cfg,
        num_epochs=3,
        optim=dataclasses.replace(cfg.optim, learning_rate=1e-4, warmup_steps=100),
        lora=LoRAConfig(enabled=True, dropout=0.0, export="both"),
    )
