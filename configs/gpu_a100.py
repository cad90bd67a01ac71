"""The reference DocVQA recipe on one A100-40GB, done right.

Florence-2-base-ft on HuggingFaceM4/DocumentVQA, prompt "<DocVQA>" + question, first answer as target,
AdamW lr 1e-6, linear schedule without warmup, 7 epochs, vision tower really frozen (optax masking: no
gradient, no moments), padding excluded from the loss, gradient clipping at 1.0, bf16 compute with fp32
master weights, validation on the whole split (beam 3), resumable checkpoints.

Batch size: `python -m scripts.aot_compile --config gpu_a100.py` compiles this step (base model, 768x768,
frozen tower, bf16) with the CPU compiler and reports per-device memory: batch 64 needs 50.9 GiB (does not
fit 40 GiB), batch 32 needs 26.9 GiB (fits, 67%; at 7f1962d, the GPU's vision stages unrolled: 68.6 and
35.7 GiB with them scanned, 2026-11-28). The CPU compiler's figure is an upper bound for the GPU
(it keeps more bf16 work in float32 and schedules without a memory limit), so 32 is the largest batch
this check guarantees; on the device, try 48 and watch the memory, or raise `grad_accum_steps` for a
larger effective batch. The vision tower's forward dominates: 192x192 stage-0 grids x 64 images.

XLA:GPU's own compile of the step for an A100-40GB (``--topology a100``, made on a machine without a GPU
through JAX's CUDA plugin; docs/scale-out.md, 2026-12-07, at 21d7994 with the GPU's flash attention kernels):
batch 32 needs 8.4 GiB, batch 64 15.7 GiB (14.1 and 27.2 with the einsums for attention, at 7f1962d). The
batch stays 32, the recipe's; the device has the last word (autotuning and cuDNN's workspaces are not in
that figure).
"""

from train.config import DataConfig, EvalConfig, MixtureComponent, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    # Every other setting is the default (train/config.py): Florence-2-base-ft, lr 1e-6 linear without warmup,
    # 7 epochs, the vision tower frozen, 768 px, 64 prompt and target tokens, beam 3.
    return TrainConfig(
        batch_size=32,
        log_every_steps=20,
        data=DataConfig(
            mixture=(MixtureComponent(source="HuggingFaceM4/DocumentVQA"),),
            num_workers=8,  # ~20 pages/s per worker (decode + resize): 8 feed ~140 examples/s (docs/scale-out.md)
        ),
        model=ModelConfig(hardware="a100", attention_impl="dot_product"),
        eval=EvalConfig(batch_size=32),
    )
