"""Episodic meta-training: configuration, optimisers and schedule, the training loop."""
