"""What the three adapters share: the search options, the client, and an answer as documents.

No framework is imported here. Each adapter module asks `options()` for a validated set of search
options, `client()` for the RagClient it searches with, and `documents()` for each result of an
answer as a `Found`: the text, and the metadata every framework's document carries:

    {**the document's own metadata,                 e.g. "domain": "neuro"
     "ragfan_id": "17000834",                       ragfan's document id
     "ragfan_score": 0.0325,                        the fused score
     "ragfan_sources": [{"retriever": "corpus", "rank": 2, "score": 0.57}, ...],   who found it, where
     "ragfan_degraded": False,                      the answer lacked some retriever
     "ragfan_missing": {}}                          when degraded: {"graph": {"status": "timeout", "error": "..."}}

ragfan's keys carry a prefix so that they never hide a key of the document's own (ragfan's win if a
document has one of these very names). A degraded answer also logs one warning on the
`serve_app.integrations` logger, so it is seen even when no document comes back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from serve_app.client import RagClient
from serve_app.schemas import FilterValue, FusionOptions, SearchRequest, SearchResponse

logger = logging.getLogger("serve_app.integrations")

# The metadata keys ragfan adds to each document (LlamaIndex keeps them out of the LLM's prompt).
METADATA_KEYS = ("ragfan_id", "ragfan_score", "ragfan_sources", "ragfan_degraded", "ragfan_missing")
# What an adapter reads when it is given neither url nor client, or a url and no api_key: as `ragfan query` does.
URL_ENV, API_KEY_ENV = "RAGFAN_URL", "RAGFAN_API_KEY"


def missing_extra(framework: str, extra: str, module: str) -> ImportError:
    """The ImportError an adapter raises when its framework is not installed."""
    return ImportError(f"serve_app.integrations.{module} needs {framework}, which is not installed: "
                       f'pip install "ragfan[{extra}]"')


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """What a search asks besides its query; a RagClient.search keyword argument each."""

    top_k: int = 10
    retrievers: list[str] | None = None
    filters: dict[str, FilterValue] | None = None
    fusion: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "retrievers": self.retrievers, "filters": self.filters, "fusion": self.fusion}


def options(
    top_k: int = 10,
    retrievers: Sequence[str] | None = None,
    filters: Mapping[str, FilterValue] | None = None,
    fusion: FusionOptions | Mapping[str, Any] | None = None,
) -> SearchOptions:
    """The options, checked as the gateway checks a request, so that a bad one fails where it is given
    (a constructor, a call's override) with a ValueError naming it, not at some later search."""
    chosen = SearchOptions(
        top_k=top_k,
        retrievers=list(retrievers) if retrievers is not None else None,
        filters=dict(filters) if filters is not None else None,
        fusion=fusion.model_dump(exclude_none=True) if isinstance(fusion, FusionOptions)
        else dict(fusion) if fusion is not None else None,
    )
    try:
        SearchRequest.model_validate({"query": "options", **chosen.kwargs()})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid ragfan search option: {problems}") from None
    return chosen


def client(url: str | None, api_key: str | None, timeout_s: float | None, given: RagClient | None) -> RagClient:
    """The RagClient an adapter searches with: `given`, or one over HTTP at `url` (default $RAGFAN_URL)."""
    if given is not None:
        if url is not None or api_key is not None or timeout_s is not None:
            raise ValueError("pass either client= or url= (with api_key= and timeout_s=), not both: "
                             "a RagClient you made already has its url, key and timeout")
        return given
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"say where ragfan is: url='http://host:8000' (or set ${URL_ENV}), or client=RagClient(...)")
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if timeout_s is None:  # RagClient's own default
        return RagClient(url=url, api_key=api_key)
    return RagClient(url=url, api_key=api_key, timeout_s=timeout_s)


def check_overrides(overrides: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(map(repr, unknown))} to {where}; valid: {', '.join(valid)}")


@dataclass(frozen=True, slots=True)
class Found:
    """One result of an answer, as every framework's document needs it."""

    id: str
    text: str
    score: float
    metadata: dict[str, Any]


def missing(response: SearchResponse) -> dict[str, dict[str, Any]]:
    """The retrievers a degraded answer lacks, or has only part of, each with its status and error."""
    if not response.degraded:
        return {}
    lacking: dict[str, dict[str, Any]] = {}
    for name, state in response.retrievers.items():
        if state.status == "skipped" and state.error is None:
            continue  # not asked: the request chose other retrievers
        partial = state.coverage is not None and state.coverage < 1  # a sharded retriever short of shards
        if state.status != "ok" or partial:
            lacking[name] = {"status": state.status, "error": state.error}
            if partial:
                lacking[name]["coverage"] = state.coverage
    return lacking


def documents(response: SearchResponse) -> list[Found]:
    """Each result with its metadata; logs one warning when the answer is degraded."""
    lacking = missing(response)
    if response.degraded:
        logger.warning("ragfan answered degraded (%d results): %s", len(response.results), "; ".join(
            f"{name} {state['status']}: {state['error'] or 'no reason given'}" for name, state in lacking.items()
        ) or "no retriever named")
    found = []
    for result in response.results:
        metadata: dict[str, Any] = {
            **(result.metadata or {}),
            "ragfan_id": result.id,
            "ragfan_score": result.score,
            "ragfan_sources": [source.model_dump() for source in result.sources],
            "ragfan_degraded": response.degraded,
            # each document its own copy: a caller that edits one document's metadata edits no other's
            "ragfan_missing": {name: dict(state) for name, state in lacking.items()},
        }
        found.append(Found(id=result.id, text=result.text or "", score=result.score, metadata=metadata))
    return found


def search(rag: RagClient, query: str, chosen: SearchOptions) -> list[Found]:
    return documents(rag.search(query, **chosen.kwargs()))


async def search_async(rag: RagClient, query: str, chosen: SearchOptions) -> list[Found]:
    return documents(await rag.search_async(query, **chosen.kwargs()))
