"""Per-sample losses and evaluation metrics for experiments, the built-in ones and yours.

A loss maps ``(output, target)`` to a tensor of shape ``(batch,)``; the trainer averages it
over the samples labelled for the task. A metric is a :class:`dst.Metric` that accumulates
a split and returns ``(value, error in percent)``.
"""

from dst._metrics import *  # noqa: F403
from dst._metrics import __all__ as __all__  # noqa: PLC0414
