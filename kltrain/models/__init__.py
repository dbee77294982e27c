"""Models: loading the policy, the frozen reference and the tokenizer
(:mod:`~kltrain.models.loading`), the embedded-model cache (:mod:`~kltrain.models.embedded`) and
the logits path used by the chunked lm_head (:mod:`~kltrain.models.logits`)."""

from kltrain.models.errors import ModelError
from kltrain.models.loading import (
    Models,
    load_causal_lm,
    load_models,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "ModelError",
    "Models",
    "load_causal_lm",
    "load_models",
    "load_tokenizer",
    "resolve_model",
]
