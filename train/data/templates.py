"""Record -> Example: what the model is asked (prompt), what it should answer (target), what counts as right.

A template is the only place that knows a dataset's column names, so the pipeline stays dataset-agnostic. A
record that cannot make an example (no answers, no image column) raises ``BadRecordError`` with a short reason
code; the pipeline skips it and counts the reason instead of crashing a long run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "BadRecordError",
    "Example",
    "Template",
    "docvqa",
    "get_template",
    "prefix_suffix",
    "register_template",
    "template_names",
]

DOCVQA_TASK = "<DocVQA>"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training/eval example before tokenization.

    ``image`` is whatever the record holds (PIL image, ``{"bytes", "path"}`` dict, path string, raw bytes or
    None): decoding is the pipeline's job, done in grain workers.
    """

    prompt: str
    target: str
    references: tuple[str, ...]
    image: Any


class BadRecordError(ValueError):
    """A record that cannot become an Example; ``reason`` is a short code used as a counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


Template = Callable[[Mapping[str, Any]], Example]

_REGISTRY: dict[str, Template] = {}


def register_template(name: str) -> Callable[[Template], Template]:
    """Decorator: make a template available by name (``DataConfig.template``)."""

    def decorate(fn: Template) -> Template:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"template {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def get_template(name: str) -> Template:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; registered: {sorted(_REGISTRY)}") from None


def template_names() -> list[str]:
    return sorted(_REGISTRY)


def _require(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise BadRecordError("missing_field", f"record has no {key!r} (has {sorted(record)})")
    return record[key]


@register_template("docvqa")
def docvqa(record: Mapping[str, Any]) -> Example:
    """DocVQA rows: prompt ``"<DocVQA>" + question``, target the first answer, references all answers.

    ``<DocVQA>`` is not one of Florence-2's built-in tasks, so the processor passes it through as plain text
    (the usual Florence-2 DocVQA fine-tuning prompt). Blank answers are dropped; a row left with none is bad
    (nothing to train on, and ANLS would be 0 for any prediction).
    """
    question = _require(record, "question")
    if not isinstance(question, str) or not question.strip():
        raise BadRecordError("empty_question")
    answers = _require(record, "answers")
    if isinstance(answers, str):
        answers = [answers]
    references = tuple(a.strip() for a in (answers or []) if isinstance(a, str) and a.strip())
    if not references:
        raise BadRecordError("empty_answers")
    return Example(
        prompt=DOCVQA_TASK + question.strip(),
        target=references[0],
        references=references,
        image=_require(record, "image"),
    )


@register_template("prefix_suffix")
def prefix_suffix(record: Mapping[str, Any]) -> Example:
    """Generic JSONL fine-tuning rows ``{"image": ..., "prefix": prompt, "suffix": answer}`` (the PaliGemma /
    Florence-2 community format). The suffix is the only reference."""
    prefix = _require(record, "prefix")
    suffix = _require(record, "suffix")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise BadRecordError("missing_field", "prefix and suffix must be strings")
    if not suffix.strip():
        raise BadRecordError("empty_answers")
    return Example(prompt=prefix, target=suffix, references=(suffix,), image=_require(record, "image"))
