"""peftlab: controlled, reproducible comparisons of parameter-efficient fine-tuning strategies."""

__version__ = "0.1.0"
