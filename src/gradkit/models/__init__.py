"""Small plain-torch models for experiments (no transformers dependency)."""

from gradkit.models.toy import Block, ToyTransformer, toy_transformer

__all__ = ["Block", "ToyTransformer", "toy_transformer"]
