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
32): 33.9 GiB per device, fits 40 GiB (gpu_a100.py without adapters: 35.7 GiB). Adapter dropout 0.05 raises it to
43.5 GiB (each adapted layer keeps a dropped copy of its input for the backward pass), which does not fit:
with dropout, lower the batch or raise ``grad_accum_steps``.
"""

from train.config import (
    DataConfig,
    EvalConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        max_steps=0,
        num_epochs=3,
        batch_size=32,
        checkpoint_every_steps=500,
        eval_every_steps=0,  # each epoch's end
        log_every_steps=20,
        keep_checkpoints=2,
        data=DataConfig(
            source="HuggingFaceM4/DocumentVQA",
            train_split="train",
            eval_split="validation",
            template="docvqa",
            image_size=768,
            max_prompt_tokens=64,
            max_target_tokens=64,
            num_workers=8,
        ),
        model=ModelConfig(
            hardware="a100",  # the formulations and device facts (florence_jax.hardware)
            name_or_path="florence-community/Florence-2-base-ft",
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="dot_product",
            remat_policy="none",
        ),
        optim=OptimConfig(
            learning_rate=1e-4,
            schedule="linear",
            warmup_steps=100,
            weight_decay=0.01,
            max_grad_norm=1.0,
            freeze=(r"^model\.vision_tower\.",),
        ),
        lora=LoRAConfig(
            enabled=True,
            rank=16,
            alpha=32.0,
            dropout=0.0,
            targets=(r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",),
            export="both",
        ),
        mesh=MeshConfig(data=-1, fsdp=1),
        eval=EvalConfig(num_beams=3, max_new_tokens=64, batch_size=32),
    )
