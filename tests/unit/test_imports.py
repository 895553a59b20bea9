"""The light modules stay light: the gateway, the CLI and the config never load a retriever's libraries."""

import subprocess
import sys

import pytest

# What opening a retriever costs (about a second): none of it belongs in the config or the spec.
HEAVY = ("numpy", "faiss", "bm25s", "Stemmer", "torch", "sentence_transformers")


@pytest.mark.parametrize("module", ["actors.spec", "serve_app.config"])
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
