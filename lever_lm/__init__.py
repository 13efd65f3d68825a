"""Lever-LM RL data: candidate ICD sequences for a VQA query, scored by a real VQA model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lever-lm-rl-data")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
