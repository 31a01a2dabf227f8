"""vlm: a small, correct trainer for vision-language models.

Loading and querying a trained model from Python:
    from vlm import load_pretrained
    loaded = load_pretrained("outputs/run/checkpoints/final")   # .model, .tokenizer, .processor, .config
"""

from vlm.checkpoint import export_language_model, save_pretrained
from vlm.models.vision_language_model import VisionLanguageModel
from vlm.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "VisionLanguageModel", "export_language_model", "load_pretrained", "save_pretrained"]
