"""The paper's metrics, each as the original evaluation code computes it (one module per family)."""
from qwenvl_eval.metrics.common import MetricInputError

__all__ = ['MetricInputError']
