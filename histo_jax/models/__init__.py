"""Models: EfficientNet-B0 encoder, cross-attention fusion classifier, PyTorch weight import."""
from histo_jax.models.config import get_model_config
from histo_jax.models.build import build_model, load_pytorch
from histo_jax.models.convert import WeightImportError, load_encoder_weights, load_state_dict
from histo_jax.models.efficientnet import EfficientNet
from histo_jax.models.fusion import MultiInputClassifier

__all__ = ["EfficientNet", "MultiInputClassifier", "WeightImportError", "build_model",
           "get_model_config", "load_encoder_weights", "load_pytorch", "load_state_dict"]
