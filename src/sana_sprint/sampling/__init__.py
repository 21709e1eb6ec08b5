"""Stateless samplers taking callables: noise, guidance, flow/TrigFlow Euler, consistency."""

from .consistency import consistency
from .euler import flow_euler, trigflow_euler
from .guidance import cfg, cfg_batched
from .noise import randn

__all__ = ["cfg", "cfg_batched", "consistency", "flow_euler", "randn", "trigflow_euler"]
