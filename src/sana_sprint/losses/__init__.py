"""Losses: per-sample loss functions + logged terms (no I/O, no optimisers)."""

from .flow_matching import CAPTION_DROPOUT, FlowDraws, flow_matching_loss

__all__ = ["CAPTION_DROPOUT", "FlowDraws", "flow_matching_loss"]
