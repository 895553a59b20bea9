"""The query encoder: a model server shared by every retriever that uses the same model.

Without it, each dense retriever (and the graph's entity linking) loads the same model and encodes
the same query again. With it, the gateway sends each query's text here once, gets one vector, and
passes it on to every retriever of that model, which then needs no torch at all.

Where it runs is `encoder.placement`:
- `deployment`: one deployment per distinct model (`encoder` for the default model, `encoder-<hash>`
  for another). Calls carry lists of texts, since the gateway already groups concurrent requests;
  `@serve.batch` merges what several gateway replicas send at the same moment. Put it on a GPU with
  `encoder.ray_actor_options.num_gpus` in the config.
- `gateway`: each gateway replica holds a `GatewayEncoder` per model and encodes in-process, on a
  worker thread: one process and one actor call per request fewer.

`encoder.backend` picks what runs the model on the CPU: `onnx` (the default: onnxruntime, two thirds
of torch's CPU for a lone query, the same vectors, and no torch in the replica) or `torch`. A replica
with a GPU runs torch whatever the setting (actors/embedder.py, `make_embedder`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray
from ray import serve

from actors.embedder import DEFAULT_MODEL, Embedder, assigned_device, limit_threads, make_embedder, resolve_model
from actors.encoder_backend import DEFAULT_ENCODER_BACKEND, effective_backend
from actors.errors import RetrieverFailed
from actors.metrics import ray_instruments

logger = logging.getLogger("ray.serve")
# sentence-transformers sorts a call's texts by length and runs them in sub-batches of this size, so
# each pads only to its own longest text. Measured on the CPU, one torch thread, SciFact claims:
# 32 texts cost 11.7 CPU ms each as one sub-batch and 7.8 in sub-batches of 8 (docs/BENCHMARKS.md).
# A GPU wants wide sub-batches instead.
CPU_SUB_BATCH, GPU_SUB_BATCH = 8, 128


def encoder_name(model: str) -> str:
    """The deployment name of a model's encoder: stable, and a valid Serve name for any model path."""
    if model == DEFAULT_MODEL:
        return "encoder"
    return "encoder-" + hashlib.sha256(resolve_model(model)[0].encode()).hexdigest()[:8]


class QueryEncoder:
    """One model on one device, with its thread budget: what an encoder replica holds, and what a
    gateway replica holds with `encoder.placement: gateway`."""

    def __init__(self, model: str = DEFAULT_MODEL, *, num_cpus: float = 1.0,
                 backend: str = DEFAULT_ENCODER_BACKEND) -> None:
        self.model = model
        self.device = assigned_device()
        self.backend = effective_backend(backend, self.device)
        # torch's thread pool is sized only where torch runs: importing it costs a few hundred MB.
        self.threads = limit_threads(num_cpus, torch=self.backend == "torch", faiss=False)
        self.start_error: str | None = None
        self.embedder: Embedder | None = None
        try:
            self.embedder = make_embedder(model, backend=self.backend, threads=self.threads, device=self.device)
            self.embedder.encode(["warm-up query"])  # the model's lazy set-up, before the first user's deadline
            logger.info("encoder for %s ready on %s (%s)", self.embedder.name, self.device, self.backend)
        except Exception as exc:
            # Stay up and say why: the dense retrievers answer `error` with this reason, the rest still answer.
            self.start_error = f"failed to start: {type(exc).__name__}: {exc}"[:500]
            logger.error("encoder for %s %s", model, self.start_error)

    async def encode(self, texts: list[str]) -> np.ndarray:
        """One L2-normalised float32 row per text."""
        if self.embedder is None:
            raise RetrieverFailed(f"encoder for {self.model} {self.start_error}")
        return await self._encode_now(texts)

    async def _encode_now(self, texts: list[str]) -> np.ndarray:
        assert self.embedder is not None  # encode() answers for an encoder without a model
        # The forward pass holds a thread for milliseconds: keep it off the replica's event loop.
        sub_batch = CPU_SUB_BATCH if self.device == "cpu" else GPU_SUB_BATCH
        return await asyncio.to_thread(self.embedder.encode, texts, batch_size=sub_batch)

    def describe(self) -> dict[str, Any]:
        base = {"model": resolve_model(self.model)[0], "threads": self.threads,
                "node_id": ray.get_runtime_context().get_node_id()}
        if self.embedder is None:
            return {**base, "error": self.start_error}
        return {**base, "dim": self.embedder.dim, "device": self.device, "backend": self.backend}


@serve.deployment(logging_config={"enable_access_log": False})
class EncoderDeployment(QueryEncoder):
    """`encoder.placement: deployment`: the model in replicas of its own, shared by every gateway replica."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        num_cpus: float = 1.0,
        max_batch_size: int = 256,
        batch_wait_timeout_s: float = 0.0,
        backend: str = DEFAULT_ENCODER_BACKEND,
    ) -> None:
        super().__init__(model, num_cpus=num_cpus, backend=backend)
        self.batch_size = ray_instruments(("ragfan_encoder_batch_size",))["ragfan_encoder_batch_size"]
        # Built per replica so that config sets the batching knobs.
        self._encode_batch = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
            self._run_batch
        )

    async def _encode_now(self, texts: list[str]) -> np.ndarray:
        return await self._encode_batch(texts)  # merged with what other gateway replicas send at the same moment

    async def _run_batch(self, calls: list[list[str]]) -> list[np.ndarray]:
        flat = [text for texts in calls for text in texts]
        self.batch_size.observe(len(flat), tags={"model": self.model})
        vectors = await super()._encode_now(flat)
        out, start = [], 0
        for texts in calls:
            out.append(vectors[start : start + len(texts)])
            start += len(texts)
        return out


class _InProcess:
    """A coroutine method called the way a Serve handle's is: `.remote(...)` gives a cancellable awaitable."""

    def __init__(self, method: Callable[..., Awaitable[Any]]) -> None:
        self._method = method

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self._method(*args))


class GatewayEncoder:
    """`encoder.placement: gateway`: a QueryEncoder in the gateway replica, reached as its deployment's
    handle is (`encode.remote(texts)`, `describe.remote()`), so the gateway's encoder lanes batch for it
    the same way. It saves a hop per request and a process; each gateway replica holds its own model."""

    def __init__(self, model: str = DEFAULT_MODEL, *, num_cpus: float = 1.0,
                 backend: str = DEFAULT_ENCODER_BACKEND) -> None:
        self.encoder = QueryEncoder(model, num_cpus=num_cpus, backend=backend)
        self.encode = _InProcess(self.encoder.encode)
        self.describe = _InProcess(self._describe)

    async def _describe(self) -> dict[str, Any]:
        return self.encoder.describe() | {"placement": "gateway"}
