"""Full fine-tune (vision tower included) on 8 H100s, global batch 64, as in the reference's 8xH100 run.

FSDP over the 8 GPUs shards parameters and Adam moments; bf16 compute, fp32 master weights, remat of
the DaViT blocks and BART layers ("dots": keep matmul outputs, recompute the rest) to fit large batches.

Data: eight GPUs at 200 examples/s each need 1,600 examples/s from this host. Decoding and resizing a
DocVQA page takes a worker about 50 ms (20/s on a slow core), so even 64 workers may fall short; from a
prepared dataset (pixels resized once, ~100 examples/s per worker) 16 keep up:
    python -m scripts.prepare_data --config gpu_h100x8_full.py --out /data/docvqa_768
    python -m train.main --config gpu_h100x8_full.py --config.data.source=/data/docvqa_768/train.array_record
The log's data_busy (near 1: the step waits for data) says which case a run is in (docs/scale-out.md).
"""

from train.config import DataConfig, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        num_epochs=7,
        batch_size=64,
        checkpoint_every_steps=500,
        log_every_steps=20,
        data=DataConfig(
            source="HuggingFaceM4/DocumentVQA",
            image_size=768,
            max_prompt_tokens=64,
            max_target_tokens=64,
            num_workers=64,  # decoding pages; 3 suffice from a prepared dataset (docs/scale-out.md)
        ),
        model=ModelConfig(
            hardware="h100",  # the formulations and device facts (florence_jax.hardware)
            name_or_path="florence-community/Florence-2-base-ft",
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="dot_product",
            remat_policy="dots",
        ),
        optim=OptimConfig(learning_rate=1e-6, schedule="linear", max_grad_norm=1.0, freeze=()),
        mesh=MeshConfig(data=1, fsdp=8, fsdp_min_size=2**16),
        eval=EvalConfig(num_beams=3, max_new_tokens=64, batch_size=64),
    )
