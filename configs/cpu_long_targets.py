"""Targets past the checkpoint's learned positions, on a CPU: the shipped tiny reader (512 positions) grown to 640
and fine-tuned on generated forms extracted as JSON of 573-600 tokens (``train/data/synthetic_long.py``).

The workflow of "Florence-2-base (1,024 positions) fine-tuned on 2,000-token OCR or JSON targets", scaled down to
the reader: ``model.max_positions`` grows both position tables at load (the reader's 512 rows kept bit for bit,
the new ones by ``model.position_init``, florence_jax/positions.py), the targets run up to 88 tokens past the old
limit,
and ``eval.no_repeat_ngram_size=0`` keeps the JSON's repeated n-grams (the rows all share ``", "item": "``).
Afterwards ``python -m scripts.long_targets score --model <workdir>/export`` prints the token accuracy per range of
256 positions: the positions past 512 are learned when they match the ones below (figures in docs/benchmarks.md).
"""

from florence_jax.assets import TINY_READER
from train.config import (
    DataConfig,
    EvalConfig,
    MixtureComponent,
    ModelConfig,
    OptimConfig,
    SyntheticConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        max_steps=300,
        checkpoint_every_steps=100,
        eval_every_steps=300,
        eval_at_start=False,
        compilation_cache_dir=None,
        data=DataConfig(
            mixture=(MixtureComponent(source="synthetic_long", template="json", metric="exact_match"),),
            synthetic=SyntheticConfig(num_val=8, image_size=64),
            image_size=64,  # the reader's input size (the image is plain grey: the answer is in the prompt)
            max_prompt_tokens=24,
            max_target_tokens=600,
        ),
        model=ModelConfig(name_or_path=str(TINY_READER), preset="tiny", dtype="float32", max_positions=640),
        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=30, weight_decay=0.05),
        eval=EvalConfig(num_beams=1, max_new_tokens=600, batch_size=8, num_print=1, no_repeat_ngram_size=0),
    )
