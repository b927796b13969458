"""The one error the data step raises; its message names the file, row and reason."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be used as configured; the message says where and what to do."""
