"""Data sources, templates and the input pipeline.

Text lengths of a batch, the defaults of both the run's data settings (``train.config.DataConfig``) and the
pipeline's own (``train.data.pipeline.PipelineConfig``):
"""

MAX_PROMPT_TOKENS = 64  # text tokens after the image tokens (question), truncated and counted
MAX_TARGET_TOKENS = 64  # answer tokens incl. eos, truncated and counted
