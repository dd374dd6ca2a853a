from .mlp import EmbeddingMLP

__all__ = ["EmbeddingMLP"]
