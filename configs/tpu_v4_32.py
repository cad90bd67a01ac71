"""TPU v4-32 pod slice (16 chips, 4 hosts): Florence-2-large full fine-tune on DocVQA.

Multi-host: launch the same command on every worker; each host reads its shard of the data (grain
per-process sharding) and the global batch is assembled with make_array_from_process_local_data.
Mesh data=4 x fsdp=4: parameters and Adam moments sharded 4 ways, batch split 16 ways (8 per chip, 32 per
host). libtpu compiles it at 18.2 GiB per chip of 32 (docs/scale-out.md). Check it fits before renting:
    python -m scripts.aot_compile --config tpu_v4_32.py --topology v4:2x2x4
"""

from train.config import (
    DataConfig,
    EvalConfig,
    MeshConfig,
    MixtureComponent,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        batch_size=128,
        checkpoint_every_steps=250,
        log_every_steps=20,
        data=DataConfig(mixture=(MixtureComponent(source="HuggingFaceM4/DocumentVQA"),), num_workers=16),
        model=ModelConfig(name_or_path="florence-community/Florence-2-large-ft", preset="large", remat_policy="dots",
                          hardware="v4"),
        optim=OptimConfig(learning_rate=2e-6, warmup_steps=100, freeze=()),
        mesh=MeshConfig(data=4, fsdp=4, fsdp_min_size=2**16),
        eval=EvalConfig(batch_size=128),
    )
