"""Metrics that judge samples: the shipped digit model's (digit accuracy, Fréchet distance in the
classifier's space) and any model's (FID, KID, precision/recall in Inception space, CLIP score),
combined by :class:`MetricSet`. The modules of the latter are imported when a config names them."""

from .collection import MetricSet
from .digits import DigitClassifier, DigitMetrics, digit_from_prompt, digit_metrics, load_digit_classifier

__all__ = ["DigitClassifier", "DigitMetrics", "MetricSet", "digit_from_prompt", "digit_metrics",
           "load_digit_classifier"]
