import ast
import socket
from pathlib import Path

from serve_app.cli import format_response, main
from serve_app.config import check_startable, parse_config
from serve_app.schemas import SearchResponse

ROOT = Path(__file__).resolve().parents[2]


def test_actors_never_import_serve_app():
    for path in (ROOT / "actors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "serve_app" for n in names), path


def test_query_reports_an_unreachable_service(capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["query", "hello", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "cannot reach ragfan" in capsys.readouterr().err


def test_query_rejects_a_malformed_filter(capsys):
    assert main(["query", "hello", "--filter", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_serve_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrievers: [{name: x, kind: nope, data: d.jsonl}]")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "retrievers.0.kind" in err and "Traceback" not in err


def test_serve_refuses_a_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_serve_refuses_a_config_where_no_retriever_can_start(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("retrievers: [{name: docs, kind: keyword, data: nowhere.jsonl}]")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no retriever can start" in err and "retrievers.0.data: file not found" in err and "nowhere.jsonl" in err


def test_some_missing_files_are_problems_to_warn_about_not_a_refusal(tmp_path):
    (tmp_path / "here.jsonl").write_text('{"id": "a", "text": "x"}\n')
    raw = {"retrievers": [{"name": "ok", "kind": "keyword", "data": "here.jsonl"},
                          {"name": "gone", "kind": "keyword", "data": "nowhere.jsonl"}]}
    config = parse_config(raw, base_dir=tmp_path)
    assert list(check_startable(config)) == ["gone"]
    assert "retrievers.1.data: file not found" in check_startable(config)["gone"]


def test_format_response_shows_results_and_statuses():
    text = format_response(SearchResponse.model_validate({
        "query": "vitamin d",
        "results": [{"id": "42", "score": 0.03, "text": "Vitamin D\nand MS", "metadata": {},
                     "sources": [{"retriever": "corpus", "rank": 1, "score": 0.8}]}],
        "retrievers": {"corpus": {"status": "ok", "latency_ms": 12.5, "num_hits": 1, "error": None},
                       "graph": {"status": "timeout", "latency_ms": 300.0, "num_hits": 0, "error": "no answer"}},
        "degraded": True,
        "latency_ms": 301.0,
    }))
    assert "corpus#1" in text and "Vitamin D and MS" in text
    assert "timeout" in text and "degraded: yes" in text


def test_serve_refuses_ray_options_for_a_cluster_it_does_not_start(capsys):
    # free port: nothing listens on it; the refusal comes before ray.init, so no Ray starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--port", str(port), "--address", "auto", "--ray-dashboard"]) == 2
    assert "set them where that cluster is started" in capsys.readouterr().err


def test_serve_names_a_setting_serve_would_reject_before_starting_ray(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init reached: the bad setting was not caught when the config was read")

    monkeypatch.setattr(ray, "init", no_ray)
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "text": "x"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway: {max_ongoing_requests: 0}\nretrievers: [{name: docs, kind: keyword, data: docs.jsonl}]")
    with socket.socket() as s:  # a free port: the port check passes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--config", str(cfg), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ragfan: error: invalid config {cfg}:")
    assert "gateway.max_ongoing_requests: Input should be greater than or equal to 1" in err
    assert "Traceback" not in err and "DeploymentConfig" not in err
