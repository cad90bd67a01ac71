"""Checkpoints that ship with florence-jax.

``TINY_READER``: a 2.3M-parameter Florence-2 pretrained by ``scripts/pretrain_tiny.py`` on generated scenes
(captions, ``<OD>`` boxes, ``<OCR>`` words), in transformers' native layout with its processor files: the
starting point of the CPU demo (``configs/cpu_demo.py``). Load it as any checkpoint directory:
``Florence2ForConditionalGeneration.from_pretrained(TINY_READER)``. Its ``README.md`` says how it was made.
"""

from pathlib import Path

__all__ = ["TINY_READER"]

TINY_READER = Path(__file__).resolve().parent / "tiny_reader"
