"""What a replica needs to open one retriever: its kind's options and where its data is.

Each kind has its own options model, with its fields and their defaults defined here and nowhere
else: `serve_app.config` builds its per-kind retriever configs on these models (the YAML keys of a
retriever are these fields plus the deployment's), and `actors.factory` reads them as typed
attributes. `KindOptions` is the discriminated union of the four, tagged by `kind`.

Light on purpose: pydantic and the standard library only, no numpy, FAISS, bm25s or torch, so
the gateway, the CLI and the config load it without loading a retriever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The value of actors.embedder.DEFAULT_MODEL (the bundled all-MiniLM-L6-v2), repeated here because
# that module imports numpy; tests/unit/test_imports.py checks that the two agree.
DEFAULT_MODEL = "default"

Kind = Literal["dense", "keyword", "graph", "synthetic"]
IndexType = Literal["flat", "hnsw"]
EncoderPlacement = Literal["shared", "local"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TextOptions(_Options):
    text_field: str = Field("text", description="the field of a JSONL document that holds its text")


class ModelOptions(_Options):
    """The kinds that embed queries with a sentence-transformers model."""

    model: str = Field(DEFAULT_MODEL, description="'default' (bundled all-MiniLM-L6-v2), a model name or a path")
    encoder: EncoderPlacement = Field(
        "shared", description="'shared' encodes each query once on the model's encoder deployment; "
        "'local' loads the model in this retriever's own replicas"
    )


class DenseOptions(ModelOptions, _TextOptions):
    kind: Literal["dense"] = "dense"
    index: IndexType = Field("flat", description="'flat' (exact) or 'hnsw' (approximate, for large collections)")


class KeywordOptions(_TextOptions):
    kind: Literal["keyword"] = "keyword"
    language: str = Field("english", description="the Snowball stemmer's language")


class GraphOptions(ModelOptions):
    kind: Literal["graph"] = "graph"
    aliases: Path | None = Field(None, description="JSON {entity: [alias, ...]} for entity linking")
    hops: int = Field(2, ge=1, le=4, description="how far the walk goes from linked entities")


class SyntheticOptions(_TextOptions):
    """Tests and benchmarks only: answers by word overlap after sleeping, or always fails."""

    kind: Literal["synthetic"] = "synthetic"
    delay_ms: float = Field(0, ge=0, description="how long each search sleeps")
    fail: Literal["never", "always"] = Field("never", description="'always': every search raises")
    hold: Path | None = Field(None, description="tests: while this file exists, every search waits before it "
                              "ranks, leaving a file '<hold>.<id>.inside' meanwhile (actors/synthetic.py)")


AnyOptions = DenseOptions | KeywordOptions | GraphOptions | SyntheticOptions
KindOptions = Annotated[AnyOptions, Field(discriminator="kind")]
OPTIONS: dict[str, type[AnyOptions]] = {
    "dense": DenseOptions, "keyword": KeywordOptions, "graph": GraphOptions, "synthetic": SyntheticOptions
}
KINDS = tuple(OPTIONS)
MODEL_KINDS = tuple(kind for kind, options in OPTIONS.items() if issubclass(options, ModelOptions))


def kinds_with(key: str) -> list[str]:
    """The kinds whose options include `key`, e.g. ['graph'] for 'hops'."""
    return [kind for kind, options in OPTIONS.items() if key in options.model_fields]


WRITE_KINDS = ("dense", "keyword")  # the kinds that take live writes (actors/delta.py)


class RetrieverSpec(BaseModel):
    """Everything a replica needs to open one retriever. Built from the config by serve_app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: KindOptions
    data: Path | None = None  # a collection to index at start ...
    artifacts: Path | None = None  # ... or a directory `ragfan ingest` wrote
    cache_dir: Path | None = None
    shard: tuple[int, int] | None = None  # (i, N): this replica holds shard i of N (dense only)
    # The app's writes directory (`writes.dir`) when this retriever takes live writes: the log is in
    # `log/`, and the versions merged from it in `bases/<deployment>` (actors/writes.py)
    writes_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> RetrieverSpec:
        if (self.data is None) == (self.artifacts is None):
            raise ValueError(f"{self.name}: give exactly one of `data` and `artifacts`")
        if self.shard is not None:
            i, n = self.shard
            if self.kind != "dense" or not 0 <= i < n:
                raise ValueError(f"{self.name}: shard {i} of {n} is not valid for kind {self.kind!r}")
        if self.writes_dir is not None and self.kind not in WRITE_KINDS:
            raise ValueError(f"{self.name}: a {self.kind} retriever does not take writes")
        return self

    @property
    def deployment(self) -> str:
        """The Serve deployment that holds this spec: the retriever's name, or its shard's."""
        return self.name if self.shard is None else f"{self.name}-shard{self.shard[0]}"

    @property
    def kind(self) -> Kind:
        return self.options.kind

    @property
    def data_file(self) -> Path:
        """`data`, where the caller opens a collection; a spec that has artifacts instead is a bug there."""
        if self.data is None:
            raise ValueError(f"{self.name} opens from artifacts, not from a data file")
        return self.data

    @property
    def artifacts_dir(self) -> Path:
        """`artifacts`, where the caller opens what `ragfan ingest` wrote."""
        if self.artifacts is None:
            raise ValueError(f"{self.name} opens from a data file, not from artifacts")
        return self.artifacts

    @property
    def model(self) -> str:
        """The model this retriever's vectors come from; kinds that embed nothing report the default."""
        return self.options.model if isinstance(self.options, ModelOptions) else DEFAULT_MODEL

    @property
    def model_name(self) -> str:
        from actors.embedder import resolve_model  # numpy: only where a retriever opens

        return resolve_model(self.model)[0]

    @property
    def shared_encoder(self) -> bool:
        """Whether queries arrive encoded by the model's encoder deployment, so no model loads here."""
        return isinstance(self.options, ModelOptions) and self.options.encoder == "shared"

    @property
    def needs_model(self) -> bool:
        """Whether this replica loads a model of its own to encode queries."""
        return isinstance(self.options, ModelOptions) and self.options.encoder == "local"
