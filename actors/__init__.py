"""The retrievers of ragfan: what each kind does, its index, and the Serve deployment that hosts it.

Nothing here imports `serve_app`; the service is built on top of these pieces. Importing the
package is cheap: the kinds (FAISS, bm25s, torch) load only when `actors.factory` is imported.
"""

from actors.base import Retriever
from actors.errors import DataError, RagError, RetrieverFailed
from actors.types import Document, Filters, Hit, Query

__all__ = ["DataError", "Document", "Filters", "Hit", "Query", "RagError", "Retriever", "RetrieverFailed"]
