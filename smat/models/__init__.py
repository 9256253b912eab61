"""Backbones and pre-trained checkpoints."""
