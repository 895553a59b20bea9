"""The errors ragfan raises.

    RagError
    ├── ConfigError            bad configuration; raised at start, names the key   (serve_app)
    ├── InvalidRequest         bad search input; the gateway answers 422           (serve_app)
    ├── NoRetrieverAvailable   every selected retriever failed; the gateway answers 503 (serve_app)
    ├── DataError              a data file is missing or malformed; names the file and line
    └── RetrieverFailed        a retriever could not load or answer

Every error carries a message meant for a person: what was wrong and what to do about it.
"""

from __future__ import annotations


class RagError(Exception):
    """Base class of every ragfan error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # errors cross process boundaries through Ray: keep them picklable
        return (type(self), (self.message,))


class DataError(RagError):
    """A data or index file is missing, unreadable or malformed."""


class RetrieverFailed(RagError):
    """A retriever could not be loaded, or failed while answering."""
