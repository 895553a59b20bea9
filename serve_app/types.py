"""The small types that several modules of the service share, each defined here once.

Plain `typing` only, no pydantic, numpy or Ray: the config, the schemas, the lanes and the client
all import it, and the light ones must stay light. `FilterValue` lives one level down, in
actors/types.py, because the retrievers filter on it too.
"""

from __future__ import annotations

from typing import Literal, get_args

# What became of one retriever's part in an answer (serve_app/outcome.py, the API's RetrieverStatus).
Status = Literal["ok", "timeout", "error", "skipped"]

# How the gateway fuses the retrievers' lists (serve_app/fusion.py).
FusionMethod = Literal["rrf", "minmax", "dbsf"]
FUSION_METHODS: tuple[FusionMethod, ...] = get_args(FusionMethod)
