"""TPU v5e-16 pod slice (16 chips, 4 hosts): Florence-2-base on DocVQA with the vision tower frozen.

Multi-host: launch the same command on every worker; each host reads its shard of the data (grain
per-process sharding) and the global batch is assembled with make_array_from_process_local_data.
Mesh data=16: v5e's 16 GiB per chip holds base's parameters and Adam moments whole, so the batch is split
16 ways (16 examples per chip, 64 per host). Full fine-tune: tpu_v5e_16_full.py (at this batch the
trained tower's activations need 54 GiB per chip). Check it fits before renting:
    python -m scripts.aot_compile --config tpu_v5e_16.py --topology v5e:4x4
"""

from train.config import DataConfig, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        num_epochs=7,
        batch_size=256,
        checkpoint_every_steps=250,
        log_every_steps=20,
        compilation_cache_dir="~/.cache/florence_jax/jax_cache",
        data=DataConfig(
            source="HuggingFaceM4/DocumentVQA",
            image_size=768,
            max_prompt_tokens=64,
            max_target_tokens=64,
            num_workers=24,  # per host: 4 chips x ~90 examples/s at ~22 pages per worker (docs/scale-out.md)
        ),
        model=ModelConfig(
            hardware="v5e",  # the formulations and device facts (florence_jax.hardware)
            name_or_path="florence-community/Florence-2-base-ft",
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="xla",
            remat_policy="none",
        ),
        optim=OptimConfig(learning_rate=1e-5, schedule="linear", warmup_steps=100, max_grad_norm=1.0,
                          freeze=(r"^model\.vision_tower\.",)),
        mesh=MeshConfig(data=16, fsdp=1),
        eval=EvalConfig(num_beams=3, max_new_tokens=64, batch_size=256),
    )
