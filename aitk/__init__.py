"""AI Toolkit: train LoRA, LoCon and full fine-tunes of diffusion models from one job file."""

__version__ = "0.1.0"
