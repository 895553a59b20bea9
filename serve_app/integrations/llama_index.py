"""ragfan as a LlamaIndex retriever (`pip install "ragfan[llamaindex]"`).

    from llama_index.core.query_engine import RetrieverQueryEngine
    from serve_app.integrations.llama_index import RagfanRetriever

    retriever = RagfanRetriever(url="http://ragfan.internal:8000", similarity_top_k=5)
    nodes = retriever.retrieve("vitamin d and multiple sclerosis")   # list[NodeWithScore]
    nodes = await retriever.aretrieve("...")                         # natively async
    engine = RetrieverQueryEngine.from_args(retriever, llm=my_llm)

Each `NodeWithScore` holds the fused score and a `TextNode` whose `id_` is ragfan's id, whose text
is the result's text and whose metadata is described in serve_app/integrations/common.py; ragfan's
own keys are excluded from what the LLM and an embedding model see, the document's own are not.
As LlamaIndex's retrievers do, this one takes its options in the constructor only (a retriever's
`retrieve` takes nothing but the query); `filters` is a `{key: value}` mapping or LlamaIndex's
`MetadataFilters` of `==` filters joined by AND, since ragfan matches metadata exactly. A search
that fails raises ragfan's own error (serve_app.client) unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from serve_app.client import RagClient
from serve_app.integrations import common
from serve_app.schemas import FilterValue, FusionOptions

try:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
except ImportError as exc:
    raise common.missing_extra("LlamaIndex (llama-index-core)", "llamaindex", "llama_index") from exc


class RagfanRetriever(BaseRetriever):
    """Searches a ragfan app: one search per `retrieve` / `aretrieve` (natively async).

    Give `url` (with `api_key` and `timeout_s`; defaults $RAGFAN_URL and $RAGFAN_API_KEY) or a ready
    `client=RagClient(...)`. `top_k` (LlamaIndex's name: `similarity_top_k`), `retrievers`,
    `filters` and `fusion` shape every search.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        top_k: int | None = None,
        similarity_top_k: int | None = None,
        retrievers: Sequence[str] | None = None,
        filters: Mapping[str, FilterValue] | MetadataFilters | None = None,
        fusion: FusionOptions | Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        client: RagClient | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if top_k is not None and similarity_top_k is not None and top_k != similarity_top_k:
            raise ValueError(f"top_k={top_k} and similarity_top_k={similarity_top_k} disagree: pass one of them")
        top_k = top_k if top_k is not None else similarity_top_k if similarity_top_k is not None else 10
        self.options = common.options(top_k, retrievers, _ragfan_filters(filters), fusion)
        self.client = common.client(url, api_key, timeout_s, client)
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [_node(found) for found in common.search(self.client, query_bundle.query_str, self.options)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        found = await common.search_async(self.client, query_bundle.query_str, self.options)
        return [_node(f) for f in found]


def _node(found: common.Found) -> NodeWithScore:
    keys = [k for k in common.METADATA_KEYS if k in found.metadata]
    node = TextNode(id_=found.id, text=found.text, metadata=found.metadata,
                    excluded_llm_metadata_keys=keys, excluded_embed_metadata_keys=list(keys))
    return NodeWithScore(node=node, score=found.score)


def _ragfan_filters(filters: Mapping[str, FilterValue] | MetadataFilters | None) -> dict[str, FilterValue] | None:
    """ragfan's `{key: value}` of a mapping, or of MetadataFilters that only ask for exact matches, all of them."""
    if not isinstance(filters, MetadataFilters):
        return dict(filters) if filters is not None else None
    if filters.condition not in (None, FilterCondition.AND) and len(filters.filters) > 1:
        raise ValueError(f"ragfan filters match every key exactly (AND): condition {filters.condition.value!r} "
                         "is not supported")
    exact: dict[str, FilterValue] = {}
    for f in filters.filters:
        if not isinstance(f, MetadataFilter) or f.operator != FilterOperator.EQ or isinstance(f.value, list):
            raise ValueError(f"ragfan filters match metadata exactly: {f!r} is not a `==` MetadataFilter; "
                             "pass MetadataFilter(key=..., value=...) filters, or a {key: value} mapping")
        if f.value is None:
            raise ValueError(f"ragfan filters need a value to match: {f.key!r} has none")
        exact[f.key] = f.value
    return exact
