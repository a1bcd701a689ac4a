"""vpt-robust: prompt-based adaptation of frozen vision(-language) models, with robustness evaluation."""

__version__ = "0.1.0"
