"""Generation defaults, read from a checkpoint's generation_config.json as transformers does."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_jax.config import Florence2Config


@dataclass(frozen=True)
class GenerationConfig:
    max_length: int | None = None  # None: transformers' default of 20 new tokens
    max_new_tokens: int | None = None
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    length_penalty: float = 1.0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    suppress_tokens: tuple[int, ...] = ()

    @classmethod
    def from_model_config(cls, cfg: Florence2Config) -> GenerationConfig:
        t = cfg.text_config
        suppress = tuple(range(cfg.num_real_tokens, t.vocab_size)) if cfg.num_real_tokens is not None else ()
        return cls(
            forced_bos_token_id=t.forced_bos_token_id, forced_eos_token_id=t.forced_eos_token_id,
            pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
            decoder_start_token_id=t.decoder_start_token_id, suppress_tokens=suppress,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: GenerationConfig | None = None) -> GenerationConfig:
        base = base or cls()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k not in names or v is None and k not in ("forced_bos_token_id", "forced_eos_token_id",
                                                          "max_new_tokens", "max_length"):
                continue
            if k == "eos_token_id" and isinstance(v, list):
                v = v[0]
            if k == "suppress_tokens":
                v = tuple(sorted(set(base.suppress_tokens) | set(v or ())))
            kw[k] = v
        return dataclasses.replace(base, **kw)

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path, cfg: Florence2Config,
                            original: bool = False) -> GenerationConfig:
        """The checkpoint's defaults. Native layout: generation_config.json over the model config, as
        transformers reads them. Original layout: the text config (``num_beams`` 3, ``no_repeat_ngram_size``
        3, ``early_stopping`` true in Microsoft's repositories), which is where the original ``generate()``
        takes its defaults from; its generation_config.json is never read there, so not here either."""
        base = cls.from_model_config(cfg)
        if original:
            raw = json.loads((Path(directory) / "config.json").read_text())
            return cls.from_dict(raw.get("text_config") or {}, base)
        path = Path(directory) / "generation_config.json"
        if path.exists():
            return cls.from_dict(json.loads(path.read_text()), base)
        return base

    def effective(self, **overrides) -> GenerationConfig:
        """These defaults with the caller's explicit settings (None: keep the default) over them."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        """The settings that decide the tokens, on one line (printed when predict and evaluation start)."""
        parts = [f"num_beams={self.num_beams}", f"no_repeat_ngram_size={self.no_repeat_ngram_size}",
                 f"early_stopping={self.early_stopping}", f"length_penalty={self.length_penalty:g}",
                 f"forced_bos_token_id={self.forced_bos_token_id}", f"forced_eos_token_id={self.forced_eos_token_id}"]
        if self.max_new_tokens is not None or self.max_length is not None:
            parts.append(f"max_new_tokens={self.max_new_tokens}" if self.max_new_tokens is not None
                         else f"max_length={self.max_length}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["suppress_tokens"] = list(self.suppress_tokens) or None
        return {k: v for k, v in d.items() if v is not None}


def describe_settings(model, num_beams: int | None = None, max_new_tokens: int | None = None,
                      no_repeat_ngram_size: int | None = None) -> str:
    """What generation will use, the checkpoint's defaults under the caller's settings, on one line, naming the
    layout the defaults came from (an original-layout checkpoint's come from its text config, as the original
    code takes them)."""
    gen = effective_settings(model, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             no_repeat_ngram_size=no_repeat_ngram_size)
    layout = getattr(model, "checkpoint_layout", "native")
    return f"{gen.describe()} (defaults of the {layout}-layout checkpoint, explicit settings over them)"


def effective_settings(model, **explicit) -> GenerationConfig:
    """The model's generation defaults with the caller's explicit settings (None: the default) over them."""
    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    return gen.effective(**explicit)


def structured_output_warning(model, what: str, no_repeat_ngram_size: int | None = None) -> str | None:
    """A warning when ``what`` (a structured output: JSON, tables, boxes) would be generated with a no-repeat
    n-gram ban, which rewrites every legitimately repeated n-gram (``", "qty": 1}`` of the second row of a JSON
    list, a coordinate trigram of two adjacent boxes); None when the ban is off."""
    n = effective_settings(model, no_repeat_ngram_size=no_repeat_ngram_size).no_repeat_ngram_size
    if not n:
        return None
    source = "set" if no_repeat_ngram_size else "the checkpoint's default"
    return (f"{what} is generated with no_repeat_ngram_size={n} ({source}): any {n}-gram that should occur twice "
            "(a repeated key-value pair, a table row, a coordinate run) is replaced by another token, which "
            "corrupts structured output; turn it off with no_repeat_ngram_size=0")
