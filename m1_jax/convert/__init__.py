"""Checkpoint formats: reading Hugging Face safetensors and mapping their keys onto the model."""
