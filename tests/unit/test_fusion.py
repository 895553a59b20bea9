import pytest

from actors.types import Hit
from serve_app.fusion import reciprocal_rank_fusion


def hits(*ids: str) -> list[Hit]:
    return [Hit(doc_id=i, score=10.0 - n, text=f"text {i}") for n, i in enumerate(ids)]


def test_rrf_scores_are_weighted_reciprocal_ranks():
    fused = reciprocal_rank_fusion({"a": hits("x", "y"), "b": hits("y")}, weights={"a": 1.0, "b": 2.0}, k=60)
    by_id = {h.doc_id: h for h in fused}
    assert by_id["x"].score == pytest.approx(1 / 61)
    assert by_id["y"].score == pytest.approx(1 / 62 + 2 / 61)
    assert [h.doc_id for h in fused] == ["y", "x"]


def test_documents_are_deduplicated_and_list_every_source():
    fused = reciprocal_rank_fusion({"a": hits("x", "y"), "b": hits("z", "x")}, k=60, top_k=10)
    assert sorted(h.doc_id for h in fused) == ["x", "y", "z"]
    x = next(h for h in fused if h.doc_id == "x")
    assert x.sources == [("a", 1, 10.0), ("b", 2, 9.0)]
    assert fused[0].doc_id == "x"


def test_a_retriever_counts_once_per_document():
    fused = reciprocal_rank_fusion({"a": hits("x", "x")}, k=60)
    assert len(fused) == 1 and fused[0].score == pytest.approx(1 / 61)


def test_top_k_and_deterministic_ties():
    fused = reciprocal_rank_fusion({"a": hits("p", "q"), "b": hits("q", "p")}, k=60, top_k=1)
    assert len(fused) == 1
    assert fused[0].doc_id == "p"  # equal scores and best ranks: doc id breaks the tie


def test_zero_weight_contributes_nothing_and_text_comes_from_the_largest_share():
    a = [Hit("x", 1.0, "from a")]
    b = [Hit("x", 1.0, "from b")]
    fused = reciprocal_rank_fusion({"a": a, "b": b}, weights={"a": 0.0, "b": 1.0}, k=60)
    assert fused[0].score == pytest.approx(1 / 61)
    assert fused[0].text == "from b"


def test_empty_input_and_bad_k():
    assert reciprocal_rank_fusion({}, k=60) == []
    assert reciprocal_rank_fusion({"a": []}, k=60) == []
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion({"a": hits("x")}, k=0)
