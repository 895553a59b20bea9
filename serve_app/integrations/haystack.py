"""ragfan as a Haystack retriever component (`pip install "ragfan[haystack]"`).

    from haystack import Pipeline
    from haystack.components.builders import PromptBuilder
    from serve_app.integrations.haystack import RagfanRetriever

    pipeline = Pipeline()
    pipeline.add_component("retriever", RagfanRetriever(url="http://ragfan.internal:8000", top_k=5))
    pipeline.add_component("prompt", PromptBuilder(template="{% for d in documents %}{{ d.content }}\\n{% endfor %}"
                                                            "Question: {{ query }}"))
    pipeline.connect("retriever.documents", "prompt.documents")
    pipeline.run({"retriever": {"query": q, "top_k": 3}, "prompt": {"query": q}})

`run` and `run_async` (natively async, what an async pipeline calls) answer `{"documents": [...]}`:
each `Document` has ragfan's id as `id`, the text as `content`, the fused score as `score`, and in
`meta` what serve_app/integrations/common.py describes. `top_k`, `filters`, `retrievers` and
`fusion` given to `run` replace the constructor's for that call (Haystack's `replace` filter
policy). `filters` is ragfan's `{key: value}`, or Haystack's filter syntax when it only asks for
exact matches: `{"field": "meta.domain", "operator": "==", "value": "neuro"}`, or such comparisons
under `{"operator": "AND", "conditions": [...]}`.

A search that fails raises ragfan's own error (serve_app.client) from `run`; a Pipeline wraps it in
its PipelineRuntimeError, whose `__cause__` is ragfan's error.

No `from __future__ import annotations` here: Haystack reads `run`'s annotations as types to build
the component's sockets.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from serve_app.client import RagClient
from serve_app.integrations import common
from serve_app.schemas import FilterValue, FusionOptions

try:
    from haystack import Document, component, default_from_dict, default_to_dict
    from haystack.utils import Secret, deserialize_secrets_inplace
except ImportError as exc:
    raise common.missing_extra("Haystack (haystack-ai)", "haystack", "haystack") from exc


@component
class RagfanRetriever:
    """Searches a ragfan app: one search per `run` / `run_async`, fused results as Documents.

    Give `url` (default $RAGFAN_URL) with `api_key` (a Haystack Secret; default: $RAGFAN_API_KEY if
    set) and `timeout_s`, or a ready `client=RagClient(...)` (a pipeline with one cannot be saved).
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: Secret | str | None = None,
        top_k: int = 10,
        retrievers: Sequence[str] | None = None,
        filters: Mapping[str, Any] | None = None,
        fusion: FusionOptions | Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        client: RagClient | None = None,
    ) -> None:
        if isinstance(api_key, str):
            api_key = Secret.from_token(api_key)
        if api_key is None and client is None:
            api_key = Secret.from_env_var(common.API_KEY_ENV, strict=False)
        self.url, self.api_key, self.timeout_s = url, api_key, timeout_s
        self.options = common.options(top_k, retrievers, ragfan_filters(filters), fusion)
        self._given_client = client is not None
        self.client = common.client(url, api_key.resolve_value() if api_key is not None else None, timeout_s, client)

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        retrievers: list[str] | None = None,
        fusion: dict[str, Any] | None = None,
    ) -> dict[str, list[Document]]:
        """The documents ragfan finds for `query`; each other argument, when given, replaces the constructor's."""
        chosen = self._options(top_k, filters, retrievers, fusion)
        return {"documents": [_document(found) for found in common.search(self.client, query, chosen)]}

    @component.output_types(documents=list[Document])
    async def run_async(
        self,
        query: str,
        top_k: int | None = None,
        filters: dict[str, Any] | None = None,
        retrievers: list[str] | None = None,
        fusion: dict[str, Any] | None = None,
    ) -> dict[str, list[Document]]:
        """`run`, without blocking the event loop."""
        chosen = self._options(top_k, filters, retrievers, fusion)
        return {"documents": [_document(found) for found in await common.search_async(self.client, query, chosen)]}

    def _options(self, top_k: int | None, filters: dict[str, Any] | None, retrievers: list[str] | None,
                 fusion: dict[str, Any] | None) -> common.SearchOptions:
        o = self.options
        return common.options(
            top_k if top_k is not None else o.top_k,
            retrievers if retrievers is not None else o.retrievers,
            ragfan_filters(filters) if filters is not None else o.filters,
            fusion if fusion is not None else o.fusion,
        )

    def to_dict(self) -> dict[str, Any]:
        """For Pipeline.dumps / dump; an api_key given as a plain token cannot be saved (Haystack refuses it)."""
        if self._given_client:
            raise ValueError("a RagfanRetriever made with client= cannot be serialized: give it url= (and an "
                             "api_key Secret from an environment variable) to save the pipeline")
        o = self.options
        return default_to_dict(
            self, url=self.url, api_key=self.api_key.to_dict() if self.api_key is not None else None, top_k=o.top_k,
            retrievers=o.retrievers, filters=o.filters, fusion=o.fusion, timeout_s=self.timeout_s,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RagfanRetriever":
        data = {**data, "init_parameters": dict(data.get("init_parameters", {}))}  # the caller's dict stays as it was
        deserialize_secrets_inplace(data["init_parameters"], keys=["api_key"])
        return default_from_dict(cls, data)


def _document(found: common.Found) -> Document:
    return Document(id=found.id, content=found.text, meta=found.metadata, score=found.score)


def ragfan_filters(filters: Mapping[str, Any] | None) -> dict[str, FilterValue] | None:
    """ragfan's `{key: value}` of ragfan's own mapping, or of Haystack filter syntax that asks for exact matches."""
    if filters is None:
        return None
    if not _haystack_syntax(filters):
        return dict(filters)
    if filters["operator"] == "AND" and "conditions" in filters:
        exact: dict[str, FilterValue] = {}
        for condition in filters["conditions"]:
            if _haystack_syntax(condition) and "conditions" in condition:
                nested = ragfan_filters(condition)
                exact.update(nested or {})
            else:
                exact.update(_comparison(condition))
        return exact
    return _comparison(filters)


def _haystack_syntax(filters: Any) -> bool:
    return isinstance(filters, Mapping) and "operator" in filters and ("field" in filters or "conditions" in filters)


def _comparison(condition: Mapping[str, Any]) -> dict[str, FilterValue]:
    field, operator = condition.get("field"), condition.get("operator")
    if operator != "==" or not isinstance(field, str) or not field.startswith("meta.") or "value" not in condition:
        raise ValueError(f"ragfan filters match metadata exactly, all of them: {dict(condition)!r} is not supported; "
                         'use {"field": "meta.<key>", "operator": "==", "value": ...}, joined by "AND", '
                         "or ragfan's {key: value}")
    return {field.removeprefix("meta."): condition["value"]}
