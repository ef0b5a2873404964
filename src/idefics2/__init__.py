"""idefics2: a fast, checkpoint-compatible implementation of the Idefics2 vision-language model."""

from .cache import KVCache
from .checkpoint import CheckpointError
from .config import (
    ConfigError,
    Idefics2Config,
    Idefics2PerceiverConfig,
    Idefics2VisionConfig,
    MistralTextConfig,
)
from .modeling import Idefics2ForConditionalGeneration, Idefics2Model, Idefics2PreTrainedModel
from .outputs import Idefics2CausalLMOutput, Idefics2ModelOutput

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Idefics2CausalLMOutput",
    "Idefics2Config",
    "Idefics2ForConditionalGeneration",
    "Idefics2Model",
    "Idefics2ModelOutput",
    "Idefics2PerceiverConfig",
    "Idefics2PreTrainedModel",
    "Idefics2VisionConfig",
    "KVCache",
    "MistralTextConfig",
]
