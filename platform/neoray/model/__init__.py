"""The GPT-NeoX model, its generation loop, FLOPs accounting and Hugging Face interop."""

from neoray.model.gpt_neox import GPTNeoX, KVCache, NeoXConfig

__all__ = ["GPTNeoX", "KVCache", "NeoXConfig"]
