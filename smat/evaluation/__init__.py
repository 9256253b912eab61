"""Few-shot evaluation: frozen episodes, fine-tuning, learning-rate search, statistics."""
