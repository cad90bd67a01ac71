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
unchanged). XLA:GPU's own compile of this config for an A100-40GB (``python -m scripts.aot_compile --config
gpu_a100_cauldron.py --topology a100``, no GPU needed; docs/scale-out.md, 2026-12-07, at 21d7994): 9.1 GiB.
"""

import dataclasses

from configs import gpu_a100
from train.config import MixtureComponent

CAULDRON = "HuggingFaceM4/the_cauldron"


def get_config():
    cfg = gpu_a100.get_config()
    (docvqa,) = cfg.data.mixture
    return dataclasses.replace(
        cfg,
        num_epochs=3,
        eval_every_steps=2000,
        data=dataclasses.replace(
            cfg.data,
            max_prompt_tokens=96,
            mixture=(
                dataclasses.replace(docvqa, name="docvqa", weight=0.50),
                MixtureComponent(name="chartqa", source=CAULDRON, subset="chartqa", train_split="train[:-500]",
                                 eval_split="train[-500:]", template="cauldron", weight=0.20,
                                 metric="relaxed_accuracy"),
                MixtureComponent(name="ai2d", source=CAULDRON, subset="ai2d", train_split="train[:-300]",
                                 eval_split="train[-300:]", template="cauldron", weight=0.15,
                                 metric="exact_match"),
                MixtureComponent(name="textvqa", source=CAULDRON, subset="textvqa", train_split="train[:-500]",
                                 eval_split="train[-500:]", template="cauldron", weight=0.15),
            ),
        ),
    )
