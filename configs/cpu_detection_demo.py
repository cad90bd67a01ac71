"""Detection on CPU: the shipped tiny reader learns `<OD>` on synthetic shapes, scored by COCO mAP.

No network, no download. The data (`train/data/synthetic_detection.py`) is written as a COCO JSON + PNGs into
the workdir and read back through the same path as real COCO data: `CocoRecords`, the `od` template
(`label<loc_x1><loc_y1><loc_x2><loc_y2>...` with Florence-2's 1000-bin quantization), box decoding with
`florence_jax.postprocess` and `train.metrics.coco_map`. Three classes (red circle, blue square, green
triangle), 1-3 non-overlapping objects per 64x64 image, box edges on a 4x4 grid of 16 px cells.

It starts from the pretrained reader the document demo uses (`florence_jax/assets/tiny_reader`, which saw
boxes of bands, shapes and words in its `<OD>` pretraining, never these classes) and trains every parameter.
Measured runs, and the from-scratch design it replaces, are in docs/benchmarks.md.
"""

from florence_jax.assets import TINY_READER
from train.config import (
    DataConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SyntheticConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        max_steps=0,
        num_epochs=3,
        batch_size=32,
        checkpoint_every_steps=100,
        eval_every_steps=0,
        log_every_steps=5,
        keep_checkpoints=2,
        compilation_cache_dir=None,
        data=DataConfig(
            source="synthetic_detection",
            template="od",
            metric="map",  # COCO box mAP of the decoded generations
            synthetic=SyntheticConfig(num_train=3200, num_val=200, image_size=64, seed=0),
            image_size=64,  # the reader's input size
            max_prompt_tokens=24,
            max_target_tokens=32,  # 3 objects of up to 5 label tokens + 4 locations, plus <s> and </s>
            num_workers=0,
        ),
        model=ModelConfig(name_or_path=str(TINY_READER), dtype="float32", param_dtype="float32"),
        optim=OptimConfig(
            learning_rate=1e-3,
            vision_learning_rate=None,
            schedule="cosine",
            warmup_steps=30,
            weight_decay=0.05,
            max_grad_norm=1.0,
            freeze=(),  # everything trains: the reader never saw these classes at this precision
        ),
        mesh=MeshConfig(data=-1, fsdp=1),
        eval=EvalConfig(num_beams=1, max_new_tokens=32, num_print=3),  # batches of 32, as training
    )
