"""Inference: the KV cache, sampling, batched generation, chat formats, the serving engine and server."""

from behemoth.inference.cache import KVCache, cache_bytes
from behemoth.inference.chat import ChatFormat, chat_format
from behemoth.inference.generate import generate, generate_reference, stream
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams

__all__ = ["ChatFormat", "KVCache", "Runner", "SamplingParams", "cache_bytes", "chat_format", "generate",
           "generate_reference", "stream"]
