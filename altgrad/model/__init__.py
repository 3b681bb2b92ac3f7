"""The GPT that AltGrad trains; quantization reaches it only through module surgery."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
