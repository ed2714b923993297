"""HTTP serving: many prompts, one frozen model, mixed-task dynamic batches."""

from .app import create_app

__all__ = ["create_app"]
