"""sana_sprint: one-step text-to-image by hybrid sCM + LADD distillation (SANA-Sprint) on diffusers."""

__version__ = "0.1.0"
