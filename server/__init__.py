"""Switchboard server: one base model, many adapters, served over gRPC."""

__version__ = "0.1.0"
