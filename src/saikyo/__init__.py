"""saikyo: image classification inference, fast and measured."""

__version__ = "0.1.0"
