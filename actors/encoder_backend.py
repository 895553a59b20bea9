"""What runs a text encoder's model: the backend names, the default, and the GPU rule.

Kept apart from actors/embedder.py, which loads numpy, so that the config and the CLI can name
the backends and still start at once (tests/unit/test_imports.py).

- `torch`: sentence-transformers itself; the GPU path.
- `onnx`: the transformer exported to ONNX once (actors/onnx_export.py) and run on onnxruntime.
- `onnx-int8`: that export with dynamic int8 weights. Measured, not offered: it costs less CPU, but
  it lowered fused nDCG@10 by more than the 0.003 allowed (docs/QUALITY.md, "Encoder backends"). The
  config refuses it; `make_embedder` and the encoder deployment's `backend` argument still take it,
  so that benchmarks/encoder_backends.py and an eval can measure it again.
"""

from __future__ import annotations

from typing import Literal, get_args

EncoderBackend = Literal["torch", "onnx"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)  # what `encoder.backend` offers
MEASURED_BACKENDS: tuple[str, ...] = (*ENCODER_BACKENDS, "onnx-int8")  # what a benchmark may run
# The query encoder's default. Measured on this machine's CPU, one thread, SciFact queries: onnx costs
# 0.66x torch's CPU for a lone query and as much (0.98x) in batches of 8, gives the same vectors and
# nDCG@10, and its process holds 197 MB against torch's 508 (docs/BENCHMARKS.md and docs/QUALITY.md,
# "Encoder backends").
DEFAULT_ENCODER_BACKEND: EncoderBackend = "onnx"


def effective_backend(backend: str, device: str) -> str:
    """The backend that runs on `device`: torch on a GPU whatever was asked (the onnxruntime that ragfan
    installs runs on the CPU), else `backend`, checked."""
    if backend not in MEASURED_BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; valid: {', '.join(ENCODER_BACKENDS)}")
    return "torch" if device != "cpu" else backend
