"""Inference: token generation."""

from behemoth.inference.generate import generate

__all__ = ["generate"]
