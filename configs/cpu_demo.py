"""The embedded default: fine-tune a small pretrained Florence-2 on document questions, on a CPU.

The workflow users come for, at a size a laptop runs in minutes: a pretrained checkpoint (the tiny reader
shipped in ``florence_jax/assets/tiny_reader``, made by ``scripts/pretrain_tiny.py`` from generated scenes with
captions, ``<OD>`` boxes and ``<OCR>`` words, never a question) loads from its directory as a Hub snapshot
would; validation shows it cannot answer the questions yet; its vision tower stays frozen (optax masking, as
``gpu_a100.py`` does for Florence-2-base-ft on DocVQA) while the rest learns to answer questions about
generated documents (``train/data/synthetic.py``: header colour, stamp side, item count, logo shape, document
type; a model that ignores the image can reach at most ~0.24 ANLS, printed at start); the export loads in
transformers.

Why the reader: a Florence-2 this small trained from random init decides by chance whether it ever starts
reading the image (its tower's output drifts to an image-independent constant while the text side learns the
answers' prior), so a from-scratch demo learned on some seeds and not on others. A reader that already sees
makes the fine-tune a question of mapping questions to what it sees, the same on every seed
(``docs/benchmarks.md`` has the measured runs).
"""

from florence_jax.assets import TINY_READER
from train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, SyntheticConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        num_epochs=3,
        batch_size=32,
        checkpoint_every_steps=100,
        log_every_steps=5,
        compilation_cache_dir=None,
        data=DataConfig(  # the generated documents (data.mixture's default dataset: "synthetic")
            synthetic=SyntheticConfig(num_train=4000, image_size=64),
            image_size=64,  # the reader's input size
            max_prompt_tokens=24,
            max_target_tokens=8,
        ),
        model=ModelConfig(name_or_path=str(TINY_READER), preset="tiny", dtype="float32"),
        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=30, weight_decay=0.05),
        eval=EvalConfig(num_beams=1, max_new_tokens=8),  # batches of 32, as training: any device count up to 32
    )
