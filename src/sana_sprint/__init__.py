"""sana_sprint: one-step text-to-image by hybrid sCM + LADD distillation (SANA-Sprint) on diffusers."""

import logging as _logging

__version__ = "0.1.0"


def _keep_fp32_warning(record: _logging.LogRecord) -> bool:
    """False for diffusers' "should be kept in float32: []" warning, which it logs on every dtype cast
    (``model.to(dtype)``) even for a class that keeps no module in float32 (the list it names is empty).

    The warning for a class that does keep modules in float32 (a non-empty list) passes unchanged. The filter
    sits on diffusers' ``models.modeling_utils`` logger by name, so installing it imports nothing.
    """
    return "should be kept in float32: []" not in record.getMessage()


_logging.getLogger("diffusers.models.modeling_utils").addFilter(_keep_fp32_warning)
