"""janus-train: distributed training for the Janus family of unified multimodal models."""

__version__ = "0.1.0"
