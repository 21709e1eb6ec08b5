"""diffusers-model glue: configs/presets, the TrigFlow wrapper, JVP-safe attention."""

from .attention import ExplicitSoftmaxAttnProcessor, explicit_cross_attention
from .presets import make_student, student_from_teacher_config
from .wrapper import TrigFlowTransformer

__all__ = [
    "ExplicitSoftmaxAttnProcessor",
    "TrigFlowTransformer",
    "explicit_cross_attention",
    "make_student",
    "student_from_teacher_config",
]
