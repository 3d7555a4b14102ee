"""Trainers that change only what the loss needs (`compute_loss`); the techniques live in their packages."""
