"""Models: `GPT`, `BERT`, `EncoderDecoder`, fine-tuning heads, and `ModelConfig` with its presets.

The configs import without JAX; the model classes are imported on first use (`flaxformer_lite._lazy`)."""
from .. import _lazy
from ..choices import RopeScaling
from .config import PRESETS, ModelConfig, list_presets, preset

_LAZY = {"GPT": ".gpt", "BERT": ".bert", "BertOutput": ".bert", "EncoderDecoder": ".encoder_decoder",
         "SequenceClassifier": ".heads", "MultipleChoice": ".heads", "TokenClassifier": ".heads"}
__getattr__, __dir__ = _lazy.lazy_attributes(__name__, _LAZY)
_CLASSES = {"gpt": "GPT", "bert": "BERT", "encoder_decoder": "EncoderDecoder"}


def build(cfg: ModelConfig):
    """The model class ``cfg.model`` names, built from ``cfg``."""
    return __getattr__(_CLASSES[cfg.model])(cfg)


__all__ = [*_LAZY, "ModelConfig", "RopeScaling", "preset", "list_presets", "PRESETS", "build"]
