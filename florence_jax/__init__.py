"""florence-jax: Florence-2 in JAX/Flax NNX."""

from florence_jax.config import Florence2Config, TextConfig, VisionConfig, base_config, large_config
from florence_jax.generation import GenerationOptions, Generator
from florence_jax.generation_config import GenerationConfig
from florence_jax.modeling.florence2 import Florence2ForConditionalGeneration, Seq2SeqLMOutput
from florence_jax.weights.load import CheckpointError

__all__ = [
    "CheckpointError",
    "Florence2Config",
    "Florence2ForConditionalGeneration",
    "GenerationConfig",
    "GenerationOptions",
    "Generator",
    "Seq2SeqLMOutput",
    "TextConfig",
    "VisionConfig",
    "base_config",
    "large_config",
]
__version__ = "0.1.0"
