"""Thin drivers: Trainer callbacks that advance the technique packages at Trainer events (never import trainers/)."""
