"""Fuzz the live HTTP API from its own OpenAPI schema with schemathesis, every check on.

Two live apps, each with `schemathesis run --checks all`, valid and invalid data, EXAMPLES cases per
operation at the least:

- the embedded default app (`ragfan`, five real retrievers): schemathesis's defaults, but for 413
  counting as a rejection of invalid data (more searches in a batch than `maxItems`). Schema-valid
  requests must be answered (no 422 the schema does not predict), invalid ones refused with a 4xx,
  nothing answers 5xx, and every answer conforms to the schema.
- the `guard` app (API keys on, one retriever that failed to start): the same, and without a key
  everything but /healthz must be 401. A search that selects only the broken retriever is answered
  503 by design (documented, with Retry-After), so that status is expected there and only there.

The seed is random per run and printed; `RAGFAN_FUZZ_SEED=N make test` replays a run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import API_KEY

EXAMPLES = 50  # per operation; each run draws a new seed, so runs add up to more (200 took 7 min per app here)
SEED = int(os.environ.get("RAGFAN_FUZZ_SEED") or random.randrange(2**31))
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# schemathesis's own list of statuses that reject invalid data, plus 413: a batch over
# gateway.max_batch_searches (the schema's maxItems) is refused as too large, as the API promises.
REJECTED = '[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", "405", "406", ' \
    '"409", "413", "415", "422", "428", "429", "5xx"]\n'

ROUTES = {("/v1/search", "post"), ("/v1/search/batch", "post"), ("/v1/retrievers", "get"), ("/v1/stats", "get"),
          ("/v1/retrievers/{name}/reload", "post"), ("/v1/documents", "post"), ("/v1/documents/delete", "post"),
          ("/dashboard", "get"), ("/healthz", "get")}
# The default app takes writes, into a log that outlives the session (~/.cache/ragfan): its write routes
# are fuzzed on the `writes` app instead, whose log is temporary (tests/integration/test_writes.py).
WRITES = "^/v1/documents"
OPEN = {"/healthz", "/dashboard"}  # the page holds no figures; it asks /v1/stats for them, with the key


def fuzz(url: str, tmp_path: Path, *args: str, config: str | None = None) -> None:
    (tmp_path / "schemathesis.toml").write_text(REJECTED + (config or ""))
    command = [str(SCHEMATHESIS), "--config-file", str(tmp_path / "schemathesis.toml"), "run", f"{url}/openapi.json",
               "--url", url, "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
               "--request-timeout", "60", *args]
    print(f"\nfuzzing {url} with seed {SEED}: RAGFAN_FUZZ_SEED={SEED} replays it")
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    summary = done.stdout[done.stdout.find("SUMMARY"):] if "SUMMARY" in done.stdout else done.stdout[-3000:]
    print(summary)
    assert done.returncode == 0, f"schemathesis found failures (seed {SEED}):\n{done.stdout[-6000:]}{done.stderr}"
    assert "generated" in summary and " failed" not in summary.split("Test cases:")[-1]


def test_the_schema_lists_every_route_and_states_the_configs_rules(base_url):
    schema = httpx.get(f"{base_url}/openapi.json").json()
    assert {(path, method) for path, ops in schema["paths"].items() for method in ops} == ROUTES
    request = schema["components"]["schemas"]["SearchRequest"]["properties"]
    assert request["retrievers"]["anyOf"][0]["items"]["enum"] == ["corpus", "keyword", "graph", "persona", "domain"]
    assert request["filters"]["anyOf"][0]["propertyNames"] == {"enum": ["domain", "persona"]}
    assert request["query"]["maxLength"] == 8192 and request["query"]["pattern"]


def test_the_default_app_passes_every_check(base_url, tmp_path):
    fuzz(base_url, tmp_path, "--exclude-path-regex", WRITES)


def test_the_guarded_app_passes_every_check_with_its_key(guard_url, tmp_path):
    fuzz(guard_url, tmp_path, "--header", f"Authorization: Bearer {API_KEY}",
         config='[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "503"]\n')


@pytest.mark.parametrize(("path", "method"), sorted(ROUTES))
def test_without_a_key_only_the_open_paths_answer(guard_url, http, path, method):
    r = http.request(method.upper(), f"{guard_url}{path}", json={"query": "x"} if method == "post" else None)
    assert r.status_code == (200 if path in OPEN else 401)
