"""Models: `GPT`, `BERT`, `EncoderDecoder`, fine-tuning heads, and `ModelConfig` with its presets."""
from .bert import BERT, BertOutput
from ..layers.embeddings import RopeScaling
from .config import PRESETS, ModelConfig, list_presets, preset
from .encoder_decoder import EncoderDecoder
from .gpt import GPT
from .heads import MultipleChoice, SequenceClassifier, TokenClassifier

_MODELS = {"gpt": GPT, "bert": BERT, "encoder_decoder": EncoderDecoder}


def build(cfg: ModelConfig):
    """The model class ``cfg.model`` names, built from ``cfg``."""
    return _MODELS[cfg.model](cfg)


__all__ = ["GPT", "BERT", "BertOutput", "EncoderDecoder", "SequenceClassifier", "MultipleChoice", "TokenClassifier",
           "ModelConfig", "RopeScaling", "preset", "list_presets", "PRESETS", "build"]
