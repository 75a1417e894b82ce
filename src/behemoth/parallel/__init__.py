"""Transformations applied to a built model from outside: activation checkpointing, compile."""

from behemoth.parallel.apply import apply_activation_checkpointing, apply_compile

__all__ = ["apply_activation_checkpointing", "apply_compile"]
