"""The onnx encoder backend: the same vectors as torch, one export per model, and the choice of backend.

The export takes seconds, so one is made per module, into a temporary cache directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actors.embedder import OnnxEmbedder, SentenceTransformerEmbedder, resolve_model
from actors.encoder_backend import MEASURED_BACKENDS, effective_backend
from actors.errors import ConfigError, RetrieverFailed
from actors.onnx_export import export_dir, local_model_dir
from serve_app.config import parse_config

TEXTS = [
    "What causes vitamin D deficiency?",
    "  Ünïcödé — ﬁancé 😀 \u200b naïve 東京 Ελληνικά \t\n\r",  # ligatures, emoji, zero-width space, CJK
    "\u0000control\u0007chars and  double  spaces",
    "",
    "word " * 2000,  # far past the 256 word pieces both truncate to
    "p53 is mutated in many cancers",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ragfan-cache")


@pytest.fixture(scope="module")
def onnx(cache_dir: Path) -> OnnxEmbedder:
    return OnnxEmbedder(cache_dir=cache_dir)


def test_onnx_gives_the_vectors_torch_gives(onnx: OnnxEmbedder):
    torch = SentenceTransformerEmbedder(device="cpu")
    for batch_size in (1, 8):
        ours, theirs = onnx.encode(TEXTS, batch_size=batch_size), torch.encode(TEXTS, batch_size=batch_size)
        assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384) == theirs.shape
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
        assert (ours * theirs).sum(axis=1).min() >= 0.9999
    assert onnx.encode([]).shape == (0, 384)


def test_the_export_is_made_once_and_reused(onnx: OnnxEmbedder, cache_dir: Path):
    assert onnx.exported and onnx.directory.parent == cache_dir / "models"
    made = (onnx.directory / "model.onnx").stat().st_mtime_ns
    again = OnnxEmbedder(cache_dir=cache_dir)
    assert not again.exported and again.directory == onnx.directory
    assert (onnx.directory / "model.onnx").stat().st_mtime_ns == made
    assert [p.name for p in (cache_dir / "models").iterdir()] == [onnx.directory.name]  # no temporary left


def test_another_model_never_reuses_an_export(tmp_path: Path):
    def model(name: str, weights: bytes) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        return tmp_path / name

    a, same, other = model("a", b"1"), model("same", b"1"), model("other", b"2")
    assert export_dir(a, cache_dir=tmp_path) == export_dir(same, cache_dir=tmp_path)  # keyed by content, not path
    assert export_dir(a, cache_dir=tmp_path) != export_dir(other, cache_dir=tmp_path)
    assert export_dir(a, cache_dir=tmp_path) != export_dir(a, "int8", cache_dir=tmp_path)


def test_a_model_that_is_not_on_disk_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RetrieverFailed, match="neither a directory nor in the Hugging Face cache.*backend: torch"):
        local_model_dir("nobody/no-such-model")


def test_a_process_encoding_with_onnx_never_imports_torch(onnx: OnnxEmbedder, cache_dir: Path):
    code = (
        "import sys; from pathlib import Path; from actors.embedder import OnnxEmbedder; "
        f"e = OnnxEmbedder(cache_dir=Path({str(cache_dir)!r})); e.encode(['a query']); "
        "assert not e.exported; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_config_takes_a_backend_and_names_the_choices_of_a_bad_one():
    base = {"retrievers": [{"name": "docs", "kind": "keyword", "data": "d.jsonl"}]}
    assert parse_config(base, base_dir=Path(".")).encoder.backend == "onnx"
    assert parse_config({**base, "encoder": {"backend": "torch"}}, base_dir=Path(".")).encoder.backend == "torch"
    with pytest.raises(ConfigError, match="encoder.backend: Input should be 'torch' or 'onnx'$"):
        parse_config({**base, "encoder": {"backend": "tensorflow"}}, base_dir=Path("."))
    with pytest.raises(ConfigError, match="encoder.backend: Input should be 'torch' or 'onnx'$"):
        parse_config({**base, "encoder": {"backend": "onnx-int8"}}, base_dir=Path("."))  # measured, not offered
    with pytest.raises(ValueError, match="unknown encoder backend 'tf'; valid: torch, onnx$"):
        effective_backend("tf", "cpu")


@pytest.mark.parametrize("backend", MEASURED_BACKENDS)
def test_a_replica_given_a_gpu_runs_torch(backend: str):
    assert effective_backend(backend, "cuda") == "torch"
    assert effective_backend(backend, "cpu") == backend


def test_the_bundled_model_resolves_to_a_local_directory():
    assert local_model_dir(resolve_model("default")[1]).is_dir()
