"""Checkpoints in the original remote-code layout (``microsoft/Florence-2-*``), read and written natively.

Those repositories ship a plain BART tokenizer (``tokenizer.json``, ``vocab.json``), a CLIP image processor
config (``preprocessor_config.json``) whose ``auto_map`` names their own ``processing_florence2.py``, and that
Python file, which adds Florence-2's tokens to the tokenizer when it is constructed. We never import or run a
repository's code. Instead :func:`build_processor` makes transformers' native ``Florence2Processor`` from the
repo's own files and adds the same tokens in the same order:

1. the tokenizer's existing extra special tokens (none in Microsoft's repos; a fine-tune saved with the
   original processor already holds the list below, which then adds nothing);
2. ``<od>``, ``</od>``, ``<ocr>``, ``</ocr>``, ``<loc_0>`` ... ``<loc_999>``, then 20 structural tokens up to
   ``<and>`` (:data:`ADDED_TOKENS`), so on BART's 50,265 tokens ``<loc_0>`` is 50269 and ``<and>`` 51288, the
   rows of the checkpoint's 51,289-row embedding the original code uses;
3. ``<image>`` right after them (51289), the placeholder the native processor puts where image features go.
   The model's embedding gets that row at load (``Florence2Config.from_dict``), as transformers' converter
   does; the original model puts the features first and has no such id.

The processor built here (:class:`Florence2Processor`, a subclass) also keeps the original's behaviour where
the two differ on text the user writes or reads:

- prompts: a task's input text is used as written (the native processor strips it, so
  ``"<CAPTION_TO_PHRASE_GROUNDING> a car"`` would lose a space the checkpoint was trained with);
- answers: ``post_process_generation`` gives the original's results (pixel coordinates as floats at the bin
  centre rather than truncated integers; free text not stripped; OCR keeps its spacing), through
  :func:`florence_jax.postprocess.post_process_generation` with ``style="original"``.

Token ids of prompts and targets are the original processor's: ``<s>`` + text + ``</s>`` after the image
placeholders (which the original model replaces by the image features it puts first).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import Florence2Processor as _NativeProcessor

from florence_jax.postprocess import ADDED_TOKENS, default_post_processor_config, post_process_generation

__all__ = [
    "ADDED_TOKENS",
    "CODE_FILES",
    "Florence2Processor",
    "ProcessorLayoutError",
    "build_processor",
    "is_original_processor_dir",
]

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

CODE_FILES = ("processing_florence2.py", "modeling_florence2.py", "configuration_florence2.py")
"""The remote code of the original repositories: never imported or run here."""


class ProcessorLayoutError(ValueError):
    """An original-layout repository whose tokenizer does not fit its checkpoint."""


class Florence2Processor(_NativeProcessor):
    """transformers' ``Florence2Processor`` with the original remote code's prompts and post-processing.

    Built by :func:`build_processor` for original-layout checkpoints. The class keeps the native name, so
    ``save_pretrained`` writes a processor the native class loads (what a native export carries).
    """

    florence_layout = "original"

    def _construct_prompts(self, text: str | list[str]) -> list[str]:
        """The original's rule: a task token without input must be the whole prompt; a task token with input
        is replaced by its template around the rest of the text, which is kept as written (not stripped)."""
        if isinstance(text, str):
            text = [text]
        prompts = []
        for prompt in text:
            for token, task_prompt in self.task_prompts_without_inputs.items():
                if token in prompt:
                    if prompt != token:
                        raise ValueError(f"Task token {token} should be the only content in the prompt.")
                    prompt = task_prompt
                    break
            for token, task_prompt in self.task_prompts_with_input.items():
                if token in prompt:
                    prompt = task_prompt.format(input=prompt.replace(token, ""))
                    break
            prompts.append(prompt)
        return prompts

    def post_process_generation(self, text=None, sequence=None, task=None, image_size=None) -> dict[str, Any]:
        """The original processor's answer for ``task`` (see :func:`florence_jax.postprocess.post_process_generation`
        with ``style="original"``); ``sequence`` (token ids) is decoded with special tokens kept."""
        if text is None and sequence is not None:
            text = self.tokenizer.decode(sequence, skip_special_tokens=False)
        return post_process_generation(text, task, image_size, processor=self, style="original")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_original_processor_dir(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds the original layout's processor files: an ``auto_map`` to the repo's
    ``processing_florence2`` module, or no native processor config next to a tokenizer without ``<image>``."""
    directory = Path(directory)
    for name in ("preprocessor_config.json", "processor_config.json"):
        auto_map = _read_json(directory / name).get("auto_map") or {}
        if any("processing_florence2" in str(v) for v in auto_map.values()):
            return True
    if (directory / "processor_config.json").exists():
        return False
    config = _read_json(directory / "tokenizer_config.json")
    has_image_token = IMAGE_TOKEN in json.dumps(config.get("extra_special_tokens", {})) or IMAGE_TOKEN in json.dumps(
        _read_json(directory / "tokenizer.json").get("added_tokens", []))
    return (directory / "preprocessor_config.json").exists() and not has_image_token


def _warn_code_files(directory: Path) -> None:
    found = [name for name in CODE_FILES if (directory / name).exists()]
    if not found:  # a Hub snapshot of the processor files: the auto_map names the code
        found = sorted({str(v).split("--")[-1].split(".")[0] + ".py" for name in
                        ("preprocessor_config.json", "config.json")
                        for v in (_read_json(directory / name).get("auto_map") or {}).values() if v})
    if found:
        log.warning("%s: %s (the original remote code) not imported and not run; florence-jax reads the "
                    "checkpoint natively", directory, ", ".join(found))


def _tokenizer(directory: Path, vocab_size: int | None):
    """The repo's BART tokenizer with the original's tokens added in its order, then ``<image>``."""
    from tokenizers import AddedToken
    from transformers import BartTokenizerFast

    tokenizer = BartTokenizerFast.from_pretrained(os.fspath(directory))
    existing = [t for t in tokenizer.extra_special_tokens if isinstance(t, str)] if isinstance(
        tokenizer.extra_special_tokens, list | tuple) else []
    wanted = existing + [t for t in ADDED_TOKENS if t not in existing]
    tokenizer.add_special_tokens({"additional_special_tokens": wanted})
    size = len(tokenizer)
    if vocab_size is not None and size != vocab_size:
        raise ProcessorLayoutError(
            f"{directory}: the tokenizer has {size:,} tokens after Florence-2's additions, but the checkpoint's "
            f"vocabulary (config.json vocab_size) has {vocab_size:,} rows, so token ids and embedding rows would "
            "not correspond. A fine-tune that added tokens must save its tokenizer with them (and one that resized "
            "the embedding must have as many tokens as rows)")
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ProcessorLayoutError(f"{directory}: the tokenizer already holds {IMAGE_TOKEN} although the "
                                   "processor files are in the original layout")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # A tokenizer knows its named image token only when loaded with it: save and reload once.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return BartTokenizerFast.from_pretrained(tmp, extra_special_tokens={"image_token": IMAGE_TOKEN})


def _image_processor(directory: Path):
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(os.fspath(directory), trust_remote_code=False)
    if image_processor.do_convert_rgb is None:
        # Microsoft's files say null: no conversion, so a grayscale or RGBA image fails there. Converting gives
        # the same pixels for RGB images and a usable input for the others (what the data pipeline does).
        image_processor.do_convert_rgb = True
    if getattr(image_processor, "image_seq_length", None) is None:
        size = image_processor.size
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        image_processor.image_seq_length = 1 + (height // 32) * (width // 32)
    return image_processor


def build_processor(directory: str | os.PathLike) -> Florence2Processor:
    """The processor of an original-layout checkpoint directory, built natively from its own files (see the
    module docstring). Raises :class:`ProcessorLayoutError` when the tokenizer does not fit the checkpoint."""
    directory = Path(directory)
    _warn_code_files(directory)
    config = _read_json(directory / "config.json")
    vocab_size = (config.get("text_config") or {}).get("vocab_size", config.get("vocab_size"))
    tokenizer = _tokenizer(directory, vocab_size)
    return Florence2Processor(image_processor=_image_processor(directory), tokenizer=tokenizer,
                              post_processor_config=default_post_processor_config())
