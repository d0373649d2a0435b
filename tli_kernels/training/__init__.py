"""Continued pretraining of upscaled models (single process, or FSDP2 under torchrun)."""
