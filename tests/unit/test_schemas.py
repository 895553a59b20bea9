import pytest
from pydantic import ValidationError

from actors.errors import InvalidRequest
from serve_app.config import parse_config
from serve_app.gateway import validate
from serve_app.schemas import SearchRequest, SearchResponse

CONFIG = parse_config(
    {
        "max_query_chars": 20,
        "retrievers": [
            {"name": "a", "kind": "keyword", "data": "x.jsonl"},
            {"name": "b", "kind": "dense", "data": "y.jsonl", "filter_keys": ["domain"]},
        ],
    },
    base_dir=__import__("pathlib").Path("."),
)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   \n\t"}, "query"),
        ({"query": "\x00\x07 \x85\u0097"}, "query"),  # nothing left once the controls are spaces
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "top_k": "many"}, "top_k"),
        ({"query": 5}, "query"),
        ({"query": "x", "retrievers": []}, "retrievers"),
        ({"query": "x", "retrievers": "a"}, "retrievers"),
        ({"query": "x", "filters": {"k": [1]}}, "filters"),
        ({"query": "x", "timeout_ms": 0}, "timeout_ms"),
        ({"query": "x", "unknown": 1}, "unknown"),
        ({"query": "x", "fusion": {"method": "borda"}}, "method"),
        ({"query": "x", "fusion": {"k": 0}}, "k"),
        ({"query": "x", "fusion": {"weights": {"a": -1}}}, "weights"),
        ({}, "query"),
    ],
)
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        SearchRequest.model_validate(body)
    assert field in {str(part) for e in info.value.errors() for part in e["loc"]}


def test_defaults():
    r = SearchRequest(query="vitamin d")
    assert (r.top_k, r.retrievers, r.filters, r.timeout_ms) == (10, None, None, None)


def test_control_characters_in_real_text_are_searched_as_spaces():
    # U+0097 is what a cp1252 em dash becomes when the page is decoded as Latin-1
    r = SearchRequest(query="vitamin D\u0097and MS\x00 risk\x07 in\u0085 women\tand\nmen\ud800")
    assert r.query == "vitamin D and MS  risk  in  women\tand\nmen\ufffd"


def test_config_dependent_checks():
    assert validate(SearchRequest(query="ok"), CONFIG)[1] == ["a", "b"]
    assert validate({"query": "ok", "retrievers": ["b", "b"]}, CONFIG)[1] == ["b"]
    with pytest.raises(InvalidRequest) as info:
        validate({"query": "ok", "top_k": 0}, CONFIG)
    assert info.value.errors[0]["loc"] == ["body", "top_k"]
    with pytest.raises(InvalidRequest) as info:
        validate(SearchRequest(query="x" * 21), CONFIG)
    assert info.value.errors[0]["loc"] == ["body", "query"] and "limit is 20" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        validate(SearchRequest(query="x", retrievers=["a", "zzz"]), CONFIG)
    assert "'zzz'" in info.value.message and "valid: a, b" in info.value.message
    with pytest.raises(InvalidRequest, match="filter keys: domain"):
        validate(SearchRequest(query="x", filters={"colour": "red"}), CONFIG)
    with pytest.raises(InvalidRequest, match="fusion.*valid: a, b") as info:
        validate(SearchRequest(query="x", fusion={"weights": {"zzz": 1.0}}), CONFIG)
    assert info.value.errors[0]["loc"] == ["body", "fusion", "weights"]
    # a known key reaches the retrievers that filter on it; the others answer unfiltered
    assert validate(SearchRequest(query="x", retrievers=["a"], filters={"domain": "x"}), CONFIG)[1] == ["a"]


def test_response_round_trips_through_json():
    payload = {
        "query": "q",
        "results": [{"id": "1", "text": "t", "score": 0.1, "sources": [{"retriever": "a", "rank": 1, "score": 2.0}],
                     "metadata": {}}],
        "retrievers": {"a": {"status": "ok", "latency_ms": 3.0, "num_hits": 1, "error": None}},
        "degraded": False,
        "latency_ms": 4.0,
    }
    r = SearchResponse.model_validate(payload)
    assert r.results[0].sources[0].retriever == "a" and r.retrievers["a"].status == "ok"
    assert SearchResponse.model_validate_json(r.model_dump_json()) == r
