from .mlp import EmbeddingMLP
from .small_cnn import SmallCNN

__all__ = ["EmbeddingMLP", "SmallCNN"]
