"""TPU v4-32 pod slice (16 chips, 4 hosts): Florence-2-large full fine-tune on DocVQA.

Multi-host: launch the same command on every worker; each host reads its shard of the data (grain
per-process sharding) and the global batch is assembled with make_array_from_process_local_data.
Mesh data=4 x fsdp=4: parameters and Adam moments sharded 4 ways, batch split 16 ways (8 per chip, 32 per
host). libtpu compiles it at 16.6 GiB per chip of 32 (docs/scale-out.md). Check it fits before renting:
    python -m scripts.aot_compile --config tpu_v4_32.py --topology v4:2x2x4
"""

from train.config import DataConfig, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        num_epochs=7,
        batch_size=128,
        checkpoint_every_steps=250,
        log_every_steps=20,
        compilation_cache_dir="~/.cache/florence_jax/jax_cache",
        data=DataConfig(
            source="HuggingFaceM4/DocumentVQA",
            image_size=768,
            max_prompt_tokens=64,
            max_target_tokens=64,
            num_workers=16,
        ),
        model=ModelConfig(
            hardware="v4",  # the formulations and device facts (florence_jax.hardware)
            name_or_path="florence-community/Florence-2-large-ft",
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="xla",
            remat_policy="dots",
        ),
        optim=OptimConfig(learning_rate=2e-6, schedule="linear", warmup_steps=100, max_grad_norm=1.0, freeze=()),
        mesh=MeshConfig(data=4, fsdp=4, fsdp_min_size=2**16),
        eval=EvalConfig(num_beams=3, max_new_tokens=64, batch_size=128),
    )
