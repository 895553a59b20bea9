import numpy as np
import pytest

from actors.types import Hit
from serve_app.fusion import fuse


def hits(*ids: str) -> list[Hit]:
    return [Hit(doc_id=i, score=10.0 - n, text=f"text {i}") for n, i in enumerate(ids)]


def test_rrf_scores_are_weighted_reciprocal_ranks():
    fused = fuse({"a": hits("x", "y"), "b": hits("y")}, weights={"a": 1.0, "b": 2.0}, k=60)
    by_id = {h.doc_id: h for h in fused}
    assert by_id["x"].score == pytest.approx(1 / 61)
    assert by_id["y"].score == pytest.approx(1 / 62 + 2 / 61)
    assert [h.doc_id for h in fused] == ["y", "x"]


def test_documents_are_deduplicated_and_list_every_source():
    fused = fuse({"a": hits("x", "y"), "b": hits("z", "x")}, k=60, top_k=10)
    assert sorted(h.doc_id for h in fused) == ["x", "y", "z"]
    x = next(h for h in fused if h.doc_id == "x")
    assert x.sources == [("a", 1, 10.0), ("b", 2, 9.0)]
    assert fused[0].doc_id == "x"


def test_a_retriever_counts_once_per_document_at_its_best_rank():
    fused = fuse({"a": hits("x", "y", "x")}, k=60)
    assert [(h.doc_id, h.score) for h in fused] == [("x", pytest.approx(1 / 61)), ("y", pytest.approx(1 / 62))]


def test_top_k_and_deterministic_ties():
    fused = fuse({"a": hits("p", "q"), "b": hits("q", "p")}, k=60, top_k=1)
    assert len(fused) == 1
    assert fused[0].doc_id == "p"  # equal scores and best ranks: doc id breaks the tie


def test_zero_weight_contributes_nothing_and_text_comes_from_the_largest_share():
    a = [Hit("x", 1.0, "from a")]
    b = [Hit("x", 1.0, "from b")]
    fused = fuse({"a": a, "b": b}, weights={"a": 0.0, "b": 1.0}, k=60)
    assert fused[0].score == pytest.approx(1 / 61)
    assert fused[0].text == "from b"


def test_empty_input_and_bad_k():
    assert fuse({}, k=60) == []
    assert fuse({"a": []}, k=60) == []
    with pytest.raises(ValueError, match="k must be"):
        fuse({"a": hits("x")}, k=0)


def scored(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(doc_id=d, score=s, text=d) for d, s in pairs]


def test_minmax_is_a_convex_combination_of_normalised_scores():
    ranked = {"dense": scored(("x", 0.9), ("y", 0.5), ("z", 0.1)), "bm25": scored(("y", 30.0), ("x", 10.0))}
    fused = fuse(ranked, method="minmax", weights={"dense": 3.0, "bm25": 1.0}, top_k=5)
    by_id = {h.doc_id: h.score for h in fused}
    # dense normalises to x=1, y=0.5, z=0; bm25 to y=1, x=0; weights become 0.75 / 0.25
    assert by_id == pytest.approx({"x": 0.75, "y": 0.75 * 0.5 + 0.25, "z": 0.0})
    assert [h.doc_id for h in fused] == ["x", "y", "z"]


def test_dbsf_uses_mean_plus_minus_three_sigma_and_clips():
    scores = [10.0, 2.0, 1.0, 1.0, 1.0]
    fused = fuse({"a": scored(*[(f"d{i}", s) for i, s in enumerate(scores)])}, method="dbsf", top_k=5)
    arr = np.asarray(scores)
    lo, hi = arr.mean() - 3 * arr.std(), arr.mean() + 3 * arr.std()
    expected = {f"d{i}": min(1.0, max(0.0, (s - lo) / (hi - lo))) for i, s in enumerate(scores)}
    assert {h.doc_id: h.score for h in fused} == pytest.approx(expected)
    assert 0 < fused[-1].score < fused[0].score < 1  # 10.0 is inside mean + 3 sigma here: not clipped


def test_score_methods_handle_equal_scores_and_zero_weights():
    fused = fuse({"a": scored(("x", 2.0), ("y", 2.0))}, method="minmax")
    assert [h.score for h in fused] == [1.0, 1.0]
    fused = fuse({"a": scored(("x", 1.0)), "b": scored(("y", 1.0))}, method="dbsf", weights={"a": 0, "b": 0})
    assert {h.score for h in fused} == {0.0}


def test_unknown_method():
    with pytest.raises(ValueError, match="valid: rrf, minmax, dbsf"):
        fuse({"a": hits("x")}, method="borda")
