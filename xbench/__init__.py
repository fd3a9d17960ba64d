"""xbench: a benchmark suite for visual explanation methods of image classifiers."""

from xbench.base import Explainer, LoadedModel, Metric, MetricBatch, Model
from xbench.plugins import hookimpl

__version__ = "0.1.0"
PROTOCOL_VERSION = "2"

__all__ = ["Explainer", "LoadedModel", "Metric", "MetricBatch", "Model", "hookimpl",
           "__version__", "PROTOCOL_VERSION"]
