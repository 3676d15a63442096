"""Switchboard's trainer: every fine-tuning method from one config (see docs/trainer.md)."""

__version__ = "0.1.0"
