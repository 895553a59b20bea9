"""The light modules stay light: the config, the spec and the CLI's entry point never load a retriever's
libraries, so `ragfan --help`, `ragfan query` and a config check start at once.

The gateway is not claimed here: it loads numpy (the lanes pass vectors) and, through
actors/encoder.py, Ray Serve, and it runs in a replica that has paid for Ray anyway.
"""

import subprocess
import sys

import pytest

# What opening a retriever costs (about a second): none of it belongs in the config or the spec.
HEAVY = ("numpy", "faiss", "bm25s", "Stemmer", "torch", "sentence_transformers")


@pytest.mark.parametrize("module", ["actors.spec", "serve_app.config", "serve_app.cli"])
def test_importing_loads_no_retriever_library(module):
    # A fresh interpreter: this one has loaded everything by now.
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = set(run.stdout.split())
    assert not loaded & set(HEAVY), f"import {module} loads {sorted(loaded & set(HEAVY))}"


def test_the_spec_default_model_is_the_embedders():
    from actors.embedder import DEFAULT_MODEL
    from actors.spec import DEFAULT_MODEL as SPEC_DEFAULT_MODEL

    assert SPEC_DEFAULT_MODEL == DEFAULT_MODEL
