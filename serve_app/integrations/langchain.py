"""ragfan as a LangChain retriever (`pip install "ragfan[langchain]"`).

    from serve_app.integrations.langchain import RagfanRetriever

    retriever = RagfanRetriever(url="http://ragfan.internal:8000", k=5, retrievers=["corpus", "keyword"])
    docs = retriever.invoke("vitamin d and multiple sclerosis")             # list[Document]
    docs = await retriever.ainvoke("...", k=3, filters={"domain": "neuro"})  # per-call overrides

Each `Document` has the result's text as `page_content`, ragfan's id as `id`, and the metadata
described in serve_app/integrations/common.py. A search that fails raises ragfan's own error
(serve_app.client: InvalidRequest, NoRetrieverAvailable, Unauthorized, ...) unchanged, as LangChain
re-raises what a retriever raises after telling its callbacks.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from serve_app.client import RagClient
from serve_app.integrations import common
from serve_app.schemas import FilterValue

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:
    raise common.missing_extra("LangChain (langchain-core)", "langchain", "langchain") from exc

# What `invoke(query, **kwargs)` may override for one call. `k` is LangChain's name for top_k;
# `verbose` is LangChain's own (BaseRetriever.invoke reads it and passes it on).
OVERRIDES = ("filters", "fusion", "k", "retrievers", "top_k")


class RagfanRetriever(BaseRetriever):
    """Searches a ragfan app: one search per `invoke` / `ainvoke` (natively async), fused results as Documents.

    Give `url` (with `api_key` and `timeout_s`; defaults $RAGFAN_URL and $RAGFAN_API_KEY) or a ready
    `client=RagClient(...)`. `top_k` (or `k`), `retrievers`, `filters` and `fusion` are the search's
    defaults; keyword arguments to `invoke` / `ainvoke` replace them for that call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    url: str | None = None
    api_key: SecretStr | None = None
    top_k: int = 10
    retrievers: list[str] | None = None
    filters: dict[str, FilterValue] | None = None
    fusion: dict[str, Any] | None = None
    timeout_s: float | None = None
    client: RagClient | None = Field(None, exclude=True)
    _client: RagClient = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _k_is_top_k(cls, data: Any) -> Any:
        # `k` is what LangChain's retrievers (and langchain-tests) call the number of results.
        if isinstance(data, dict) and "k" in data:
            data = dict(data)
            k = data.pop("k")
            if data.get("top_k", k) != k:
                raise ValueError(f"k={k} and top_k={data['top_k']} disagree: pass one of them")
            data["top_k"] = k
        return data

    @model_validator(mode="after")
    def _connect(self) -> RagfanRetriever:
        common.options(self.top_k, self.retrievers, self.filters, self.fusion)  # a bad default fails here
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._client = common.client(self.url, key, self.timeout_s, self.client)
        return self

    def _options(self, overrides: dict[str, Any]) -> common.SearchOptions:
        overrides.pop("verbose", None)
        common.check_overrides(overrides, OVERRIDES, "RagfanRetriever.invoke")
        if "k" in overrides:
            k = overrides.pop("k")
            if overrides.setdefault("top_k", k) != k:
                raise ValueError(f"k={k} and top_k={overrides['top_k']} disagree: pass one of them")
        chosen = {"top_k": self.top_k, "retrievers": self.retrievers, "filters": self.filters,
                  "fusion": self.fusion, **overrides}
        return common.options(**chosen)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return [_document(found) for found in common.search(self._client, query, self._options(kwargs))]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        found = await common.search_async(self._client, query, self._options(kwargs))
        return [_document(f) for f in found]


def _document(found: common.Found) -> Document:
    return Document(page_content=found.text, metadata=found.metadata, id=found.id)
