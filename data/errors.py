"""The data layer's error (defined with the others in mohge.train.errors; kept importable here)."""

from mohge.train.errors import DataError

__all__ = ["DataError"]
