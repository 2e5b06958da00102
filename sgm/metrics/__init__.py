"""Metrics that judge samples (digit accuracy and Fréchet distance for the shipped digit model)."""

from .digits import DigitClassifier, DigitMetrics, digit_from_prompt, digit_metrics, load_digit_classifier

__all__ = ["DigitClassifier", "DigitMetrics", "digit_from_prompt", "digit_metrics", "load_digit_classifier"]
