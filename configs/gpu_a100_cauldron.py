"""DocVQA plus three subsets of The Cauldron, mixed by weight, on one A100-40GB (Florence-2-base-ft).

Mixture (weights are the share of training examples drawn from each dataset):

| name       | source                                   | weight | evaluated on                 | metric           |
|------------|------------------------------------------|--------|------------------------------|------------------|
| docvqa     | HuggingFaceM4/DocumentVQA                | 0.50   | its validation split         | anls             |
| chartqa    | HuggingFaceM4/the_cauldron, chartqa      | 0.20   | the last 500 rows of train   | relaxed_accuracy |
| ai2d       | HuggingFaceM4/the_cauldron, ai2d         | 0.15   | the last 300 rows of train   | exact_match      |
| textvqa    | HuggingFaceM4/the_cauldron, textvqa      | 0.15   | the last 500 rows of train   | anls             |

DocVQA keeps half of every batch so the reference task does not regress; the Cauldron subsets add charts,
diagrams (multiple choice) and scene text. The Cauldron's own docvqa subset is left out: it holds the same
training documents as HuggingFaceM4/DocumentVQA. The Cauldron has only a train split, so each subset holds
out its last rows (``train[-500:]``) for evaluation and trains on the rest; every question-answer turn of a
row is one example (template ``cauldron``). Prompts are The Cauldron's user texts as written (with their
answer-format instructions), targets its assistant texts; check a few printed validation samples before a
long run, since the exact-match metrics compare the model's output with those texts verbatim (after
lower-casing and whitespace normalization).

Evaluation reports ``anls/docvqa``, ``relaxed_accuracy/chartqa``, ``exact_match/ai2d``, ``anls/textvqa``
(and per-dataset ``val_loss/<name>``); the best checkpoint is the one with the highest weight-averaged
``score``. An "epoch" is as many examples as the four training sets hold together (each dataset is
drawn by its weight, not exactly once); set ``max_steps`` for a fixed budget.

Batch size, precision and the frozen vision tower are those of ``gpu_a100.py``. Prompts are longer here
(The Cauldron's multiple-choice questions list their options): 96 prompt tokens instead of 64, so the
encoder sees 673 positions instead of 641 (5% more; the vision tower, which dominates memory, is
unchanged). Not measured for this config: run ``python -m scripts.aot_compile --config gpu_a100_cauldron.py``
before renting the GPU, and lower ``batch_size`` or raise ``grad_accum_steps`` if it does not fit.
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

CAULDRON = "HuggingFaceM4/the_cauldron"


def get_config() -> TrainConfig:
    return TrainConfig(
        seed=0,
        max_steps=0,
        num_epochs=3,
        batch_size=32,
        checkpoint_every_steps=500,
        eval_every_steps=2000,
        log_every_steps=20,
        keep_checkpoints=2,
        data=DataConfig(
            image_size=768,
            max_prompt_tokens=96,
            max_target_tokens=64,
            num_workers=8,
            mixture=(
                MixtureComponent(name="docvqa", source="HuggingFaceM4/DocumentVQA", train_split="train",
                                 eval_split="validation", template="docvqa", weight=0.50, metric="anls"),
                MixtureComponent(name="chartqa", source=CAULDRON, subset="chartqa", train_split="train[:-500]",
                                 eval_split="train[-500:]", template="cauldron", weight=0.20,
                                 metric="relaxed_accuracy"),
                MixtureComponent(name="ai2d", source=CAULDRON, subset="ai2d", train_split="train[:-300]",
                                 eval_split="train[-300:]", template="cauldron", weight=0.15,
                                 metric="exact_match"),
                MixtureComponent(name="textvqa", source=CAULDRON, subset="textvqa", train_split="train[:-500]",
                                 eval_split="train[-500:]", template="cauldron", weight=0.15, metric="anls"),
            ),
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
            learning_rate=1e-6,
            schedule="linear",
            warmup_steps=0,
            weight_decay=0.01,
            max_grad_norm=1.0,
            freeze=(r"^model\.vision_tower\.",),
        ),
        mesh=MeshConfig(data=-1, fsdp=1),
        eval=EvalConfig(num_beams=3, max_new_tokens=64, batch_size=32),
    )
