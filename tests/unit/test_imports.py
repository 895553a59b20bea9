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


def test_serve_app_is_the_one_public_import_home():
    import actors.errors
    import serve_app

    assert serve_app.__all__ == sorted(serve_app.__all__)
    assert set(serve_app.__all__) == set(serve_app._HOMES)
    # every error, as httpx exports its own; and the errors' module lists every error it defines
    defined = {name for name, value in vars(actors.errors).items()
               if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == "actors.errors"}
    assert set(actors.errors.__all__) == defined
    assert defined <= set(serve_app.__all__)
    for name in serve_app.__all__:
        assert getattr(serve_app, name).__name__ == name
    with pytest.raises(AttributeError):
        serve_app.NoSuchThing  # noqa: B018


def test_importing_serve_app_and_its_client_stays_light():
    # `import serve_app` loads nothing; its client needs neither Ray nor numpy nor torch until it joins a cluster.
    code = ("import sys, serve_app; bare = {m.split('.')[0] for m in sys.modules}; serve_app.RagClient; "
            "client = {m.split('.')[0] for m in sys.modules}; "
            "print(' '.join(sorted(bare)), '|', ' '.join(sorted(client)))")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    bare, client = (set(part.split()) for part in run.stdout.split("|"))
    assert not bare & {"actors", "pydantic", "httpx", "ray", "numpy", "torch"}
    heavy = client & {"ray", "numpy", "torch"}
    assert not heavy, f"serve_app.RagClient loads {sorted(heavy)}"
