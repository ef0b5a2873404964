"""idefics2: a fast, checkpoint-compatible implementation of the Idefics2 vision-language model."""

from .batch_feature import BatchFeature
from .bnb import BitsAndBytesConfig
from .cache import KVCache, SlotKVCache
from .checkpoint import CheckpointError
from .config import (
    ConfigError,
    Idefics2Config,
    Idefics2PerceiverConfig,
    Idefics2VisionConfig,
    MistralTextConfig,
)
from .generation import GenerateOutput, GenerationConfig
from .image_processing import Idefics2ImageProcessor
from .modeling import Idefics2ForConditionalGeneration, Idefics2Model, Idefics2PreTrainedModel
from .outputs import Idefics2CausalLMOutput, Idefics2ModelOutput
from .pipeline import Idefics2Pipeline, pipeline
from .processing import Idefics2Processor
from .quantize import QuantizedLinear
from .streaming import TextStreamer, stream_generate
from .tokenization import Idefics2Tokenizer
from .vision import Idefics2VisionTransformer

# Drop-in names for code written against transformers' auto classes (this package has one model).
AutoProcessor = Idefics2Processor
AutoImageProcessor = Idefics2ImageProcessor
AutoTokenizer = Idefics2Tokenizer
AutoModelForVision2Seq = Idefics2ForConditionalGeneration
AutoModelForImageTextToText = Idefics2ForConditionalGeneration

__version__ = "0.1.0"

__all__ = [
    "AutoImageProcessor",
    "AutoModelForImageTextToText",
    "AutoModelForVision2Seq",
    "AutoProcessor",
    "AutoTokenizer",
    "BatchFeature",
    "BitsAndBytesConfig",
    "CheckpointError",
    "ConfigError",
    "GenerateOutput",
    "GenerationConfig",
    "Idefics2CausalLMOutput",
    "Idefics2Config",
    "Idefics2ForConditionalGeneration",
    "Idefics2ImageProcessor",
    "Idefics2Model",
    "Idefics2ModelOutput",
    "Idefics2PerceiverConfig",
    "Idefics2Pipeline",
    "Idefics2PreTrainedModel",
    "Idefics2Processor",
    "Idefics2Tokenizer",
    "Idefics2VisionConfig",
    "Idefics2VisionTransformer",
    "KVCache",
    "MistralTextConfig",
    "QuantizedLinear",
    "SlotKVCache",
    "TextStreamer",
    "pipeline",
    "stream_generate",
]
