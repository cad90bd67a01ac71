"""TPU v5e-16 pod slice (16 chips, 4 hosts): Florence-2-base on DocVQA with the vision tower frozen.

Multi-host: launch the same command on every worker; each host reads its shard of the data (grain
per-process sharding) and the global batch is assembled with make_array_from_process_local_data.
Mesh data=16: v5e's 16 GiB per chip holds base's parameters and Adam moments whole, so the batch is split
16 ways (16 examples per chip, 64 per host). Full fine-tune: tpu_v5e_16_full.py (at this batch the
trained tower's activations need 54 GiB per chip). Check it fits before renting:
    python -m scripts.aot_compile --config tpu_v5e_16.py --topology v5e:4x4
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
    # Florence-2-base-ft with the vision tower frozen, 768 px, 7 epochs: the defaults (train/config.py).
    return TrainConfig(
        batch_size=256,
        checkpoint_every_steps=250,
        log_every_steps=20,
        data=DataConfig(
            mixture=(MixtureComponent(source="HuggingFaceM4/DocumentVQA"),),
            num_workers=24,  # per host: 4 chips x ~90 examples/s at ~22 pages per worker (docs/scale-out.md)
        ),
        model=ModelConfig(hardware="v5e"),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=100),
        mesh=MeshConfig(data=16),
        eval=EvalConfig(batch_size=256),
    )
