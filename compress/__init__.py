"""Training-side LLM compression: recipe -> stages -> one training loop -> checkpoint -> export."""

from compress.errors import CompressError

__all__ = ["CompressError"]
