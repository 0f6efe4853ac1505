"""meswitch: many fine-tuned experts served from one GPU as base + salient-aware low-bit deltas."""

__version__ = "0.1.0"
