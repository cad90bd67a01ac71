"""A tiny, offline Florence-2 processor: for ``random:<preset>`` training runs, the CPU demo and tests.

A randomly initialised model has no checkpoint processor to load, and tests cannot download
microsoft/Florence-2-*, so this builds a ``Florence2Processor`` with the same structure as the published one: a byte-level BPE tokenizer in BART's layout (``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>`` after the merges) with Florence-2's added tokens
in Florence-2's order (``<od>``, ``</od>``, ``<ocr>``, ``</ocr>``, ``<loc_0..999>``, the 20
structural tokens, then ``<image>``), a CLIP image processor with Florence-2's settings at a small
size, and the published post-processing config. Only the vocabulary is small (hundreds of merges
instead of 50k), so token ids differ from the real checkpoint while every code path is the same.

Task tokens such as ``<OCR>`` are deliberately *not* vocabulary entries: the real tokenizer has
none either; the processor replaces them by natural-language prompts before tokenizing, and
free-form tokens such as ``<DocVQA>`` are tokenized as plain text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from florence_jax.postprocess import ADDED_TOKENS, default_post_processor_config
from florence_jax.processing import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from transformers import Florence2Processor

__all__ = ["FLORENCE2_ADDED_TOKENS", "IMAGE_TOKEN", "build_tiny_processor"]

IMAGE_TOKEN = "<image>"

# What Florence-2's processor adds to BART's vocabulary, in its order (ids 50265.. in the real tokenizer).
FLORENCE2_ADDED_TOKENS: tuple[str, ...] = ADDED_TOKENS

_BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

# Enough varied English for a few hundred merges: Florence-2's task prompts, document and
# question vocabulary, colours, shapes, numbers, dates and prices.
_CORPUS = (
    "What is the text in the image?",
    "What is the text in the image, with regions?",
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.",
    "Locate the phrases in the caption: a red car next to a blue house.",
    "Locate a person in the image with mask",
    "What is the polygon mask of region",
    "Locate the green box in the image.",
    "What is the region? What does the region describe? What text is in the region?",
    "What is the total amount due on this invoice?",
    "What is the invoice number? What is the date of the invoice?",
    "Who is the sender of the letter? Who signed the form?",
    "What is the name of the company? Where is the company located?",
    "How many items are listed in the table? Which page is the summary on?",
    "What colour is the box? The box is red. The circle is blue. The square is green.",
    "Colours: red, green, blue, yellow, orange, purple, black, white, grey, pink, brown.",
    "Invoice No. 12345 dated 2024-03-15. Total: $1,234.56. Tax: $98.76. Subtotal: $1,135.80.",
    "Receipt total 47.20 EUR, paid by card on 03/07/2023 at 14:35.",
    "Date: January 5, 2021. Due date: February 4, 2021. Amount: 250.00 USD.",
    "Page 1 of 3. Report for the year 2022, quarter 4, revenue 8,900,000.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000 and digits 0123456789.",
    "The document has a title, a header, a footer, a signature and a table with rows and columns.",
    "A cat sits on a table next to a laptop. A dog runs on the grass in the park.",
    "Two people stand in front of a building with a large window and a wooden door.",
    "The answer is yes. The answer is no. Question: what is written at the top of the page?",
    "Name, address, phone number, email, account number, balance, payment, customer, order.",
    "The quick brown fox jumps over the lazy dog while the bright sun shines.",
)


def _train_tokenizer(vocab_size: int, corpus: Sequence[str] = (), *, florence_tokens: bool = True):
    """Byte-level BPE in BART's layout (a ``tokenizers.Tokenizer``), with Florence-2's added tokens and
    ``<image>`` unless ``florence_tokens`` is False (the tokenizer files of an original-layout repo)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> comes after the merges, as in BART
        special_tokens=list(_BART_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((*_CORPUS, *corpus), trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", _BART_SPECIALS.index("</s>")), ("<s>", _BART_SPECIALS.index("<s>")), trim_offsets=True
    )
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    if not florence_tokens:
        return tokenizer
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in FLORENCE2_ADDED_TOKENS]
    )
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return tokenizer


def build_tiny_processor(
    save_dir: str | os.PathLike | None = None, image_size: int = 64, vocab_size: int = 500,
    corpus: Sequence[str] = (),
) -> Florence2Processor:
    """A ``Florence2Processor`` built offline in well under a second (after imports).

    Args:
        save_dir: if given, the processor is saved there and ``AutoProcessor.from_pretrained``
            reloads it with ``image_token`` intact.
        image_size: square input size; a multiple of 32 (DaViT downsamples by 32). The processor
            inserts ``1 + (image_size // 32) ** 2`` image tokens, as Florence-2's 577 for 768.
        vocab_size: BPE vocabulary size including BART's five special tokens (at most this many
            if the built-in corpus runs out of merges); Florence-2's 1024 added tokens and
            ``<image>`` come on top.
        corpus: more text to learn the merges from, after the built-in corpus (the words of the
            tasks a model will be trained on).
    """
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    from transformers import BartTokenizerFast, CLIPImageProcessorPil, Florence2Processor

    # Named extra tokens (image_token=...) survive save/load only when passed at construction; the
    # list keeps the added tokens in all_special_tokens, as in the published tokenizer config.
    tokenizer = BartTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size, corpus),
        extra_special_tokens=list(FLORENCE2_ADDED_TOKENS),
        image_token=IMAGE_TOKEN,
    )
    # The PIL backend explicitly: deterministic with or without torchvision, and what
    # florence_jax.processing.ImageTransform reproduces. It saves as "CLIPImageProcessor".
    square = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size=square,
        resample=3,  # PIL bicubic
        do_center_crop=False,
        crop_size=square,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
        image_seq_length=1 + (image_size // 32) ** 2,
    )
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=default_post_processor_config(),
    )
    if save_dir is not None:
        processor.save_pretrained(os.fspath(save_dir))
    return processor
