"""The gateway's side of live writes: check a write, embed it once per model, log it, and wait if asked.

    POST /v1/documents          {"retrievers": [...], "documents": [{"id", "text", "metadata"}], "wait": false}
    POST /v1/documents/delete   {"retrievers": [...], "ids": [...], "wait": false}

A write is checked whole before anything happens, so a batch with one bad document applies none of
it: an unknown retriever or a blank text is a 422, a retriever that takes no writes a 409, too many
documents a 413. Then the documents of the dense retrievers are embedded by the shared encoder,
once per model however many retrievers use it, and the whole write goes to the app's WriteHub
(actors/writes.py) as one record per document, each naming the deployments it is for (a sharded
retriever's: the shard that owns the id). The hub answers once the records are on disk: that is
the acknowledgement, with the sequence number of the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from actors.embedder import resolve_model
from actors.errors import Conflict, InvalidRequest, PayloadTooLarge, RagError, ServiceUnavailable
from actors.shards import shard_of
from actors.types import filter_text
from actors.wal import encode_vector
from serve_app.config import AppConfig, RetrieverConfig
from serve_app.lanes import EncoderLane
from serve_app.schemas import DeleteRequest, UpsertRequest, WriteResponse

EMBED_TIMEOUT_S = 60.0  # embedding a write of max_documents abstracts on a busy CPU encoder takes seconds


class Writer:
    """Carries writes for one gateway replica, with its config, lanes and encoder lanes."""

    def __init__(self, config: AppConfig, encoders: Mapping[str, EncoderLane], versions: Any, *,
                 learnt: Callable[[Mapping[str, int]], None]) -> None:
        """`versions`: the app's WriteHub, None when writes are off; `learnt(touched)`: tells the gateway
        the last record addressed to each deployment once a write is logged."""
        self.config = config
        self.encoders = encoders
        self.versions = versions
        self.learnt = learnt

    async def upsert(self, request: UpsertRequest | dict[str, Any]) -> WriteResponse:
        request = _parse(UpsertRequest, request)
        assert isinstance(request, UpsertRequest)
        targets = self._targets(request.retrievers, len(request.documents))
        docs = request.documents
        vectors: dict[str, list[str]] = {}  # resolved model -> each document's vector, encoded for the log
        for model in dict.fromkeys(r.encoder_model for r in targets if r.kind == "dense"):
            assert model is not None  # `writers` holds no dense retriever without a shared encoder
            vectors[resolve_model(model)[0]] = await self._embed(model, [d.text for d in docs])
        records = [{
            "op": "upsert", "to": _deployments(targets, d.id), "id": d.id, "text": d.text,
            "metadata": {k: filter_text(v) for k, v in d.metadata.items()},
            "vectors": {m: rows[i] for m, rows in vectors.items()},
        } for i, d in enumerate(docs)]
        return await self._log(records, targets, request.wait)

    async def delete(self, request: DeleteRequest | dict[str, Any]) -> WriteResponse:
        request = _parse(DeleteRequest, request)
        assert isinstance(request, DeleteRequest)
        targets = self._targets(request.retrievers, len(request.ids))
        records = [{"op": "delete", "to": _deployments(targets, i), "id": i} for i in request.ids]
        return await self._log(records, targets, request.wait)

    def _targets(self, names: list[str] | None, count: int) -> list[RetrieverConfig]:
        config = self.config
        if count > config.writes.max_documents:
            raise PayloadTooLarge(f"{count} documents in one write; the limit is writes.max_documents = "
                                  f"{config.writes.max_documents}")
        if names is not None:
            unknown = [n for n in names if n not in config.names]
            if unknown:
                raise InvalidRequest(f"unknown retriever(s) {', '.join(unknown)}; valid: {', '.join(config.names)}",
                                     errors=[{"loc": ["body", "retrievers"], "msg": f"unknown retriever {n!r}",
                                              "type": "value_error"} for n in unknown])
        if not config.enabled or not config.writes.enabled:
            raise Conflict("this app takes no writes: set `writes: {enabled: true}` in its config")
        refused = [n for n in names or [] if n not in config.writers]
        if refused:
            raise Conflict("; ".join(f"{n}: this retriever does not take writes ({_why(config.retriever(n))})"
                                     for n in refused))
        chosen = names or config.writers
        if not chosen:
            raise Conflict("no retriever of this app takes writes (only dense ones with `encoder: shared`, and "
                           "keyword ones do)")
        return [config.retriever(n) for n in dict.fromkeys(chosen)]

    async def _embed(self, model: str, texts: list[str]) -> list[str]:
        lane = self.encoders.get(model)
        if lane is None:
            raise ServiceUnavailable(f"no encoder for {model}: nothing was applied")
        try:
            rows = await lane.encode_many(list(dict.fromkeys(texts)), timeout_s=EMBED_TIMEOUT_S)
        except (TimeoutError, RagError) as exc:
            raise ServiceUnavailable(f"the encoder for {model} could not embed the documents ({exc or 'timeout'}); "
                                     "nothing was applied", retry_after_s=5) from None
        return [encode_vector(rows[t]) for t in texts]

    async def _log(self, records: list[dict[str, Any]], targets: list[RetrieverConfig], wait: bool) -> WriteResponse:
        try:
            logged = await self.versions.write.remote(records)
        except ServiceUnavailable:
            raise
        except Exception as exc:  # the hub was restarting: the write may or may not be in the log
            raise ServiceUnavailable(
                f"the write-ordering component did not answer ({type(exc).__name__}); retry: writes by id are "
                "idempotent", retry_after_s=2) from None
        self.learnt(logged["touched"])  # this gateway stops serving cached answers from before the write
        visible = False
        if wait:
            deployments = [d for r in targets for d in r.deployment_names()]
            try:
                visible = await self.versions.wait_applied.remote(deployments, logged["seq"],
                                                                  self.config.writes.wait_timeout_s)
            except Exception:  # acknowledged all the same: it is in the log
                visible = False
        return WriteResponse(accepted=len(records), sequence=logged["seq"], retrievers=[r.name for r in targets],
                             visible=visible)


def _parse(model: Any, request: Any) -> Any:
    if isinstance(request, model):
        return request
    from pydantic import ValidationError

    try:
        return model.model_validate(request)
    except ValidationError as exc:
        raise InvalidRequest.from_validation(exc.errors(include_url=False)) from None


def _deployments(targets: list[RetrieverConfig], doc_id: str) -> list[str]:
    """The deployment of each retriever that holds `doc_id`: a sharded one's owning shard."""
    return [r.deployment_names()[shard_of(doc_id, r.shards)] if r.shards > 1 else r.name for r in targets]


def _why(r: RetrieverConfig) -> str:
    if r.kind == "dense":
        return "a dense retriever with `encoder: local` has no shared encoder to embed writes"
    return f"a {r.kind} retriever holds no index a write could change"



