from pathlib import Path

import pytest

from actors.errors import ConfigError, RetrieverFailed
from actors.spec import DenseOptions, GraphOptions, KeywordOptions, SyntheticOptions
from serve_app.config import DEFAULT_CONFIG, load_config, parse_bytes, parse_config

KINDS = "dense, keyword, graph, synthetic"


def minimal(**retriever) -> dict:
    return {"retrievers": [{"name": "docs", "kind": "keyword", "data": "d.jsonl", **retriever}]}


def test_the_embedded_default_declares_the_five_retrievers():
    config = load_config()
    assert config.names == ["corpus", "keyword", "graph", "persona", "domain"]
    kinds = {r.name: r.kind for r in config.retrievers}
    assert kinds == {"corpus": "dense", "keyword": "keyword", "graph": "graph", "persona": "dense", "domain": "dense"}
    for r in config.retrievers:
        assert r.data.is_file(), r.data
        assert r.ray_actor_options.num_cpus > 0 and r.ray_actor_options.memory
    assert config.retriever("persona").filter_keys == ["persona"]
    assert config.retriever("domain").filter_keys == ["domain"]
    assert config.retriever("graph").aliases.is_file()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = parse_config(minimal(), base_dir=tmp_path)
    assert config.retrievers[0].data == tmp_path / "d.jsonl"


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (minimal(timeout_ms=0), "retrievers.0.timeout_ms: Input should be greater than or equal to 1"),
        (minimal(kind="vector"), f"retrievers.0.kind: unknown kind 'vector'; valid kinds: {KINDS}"),
        ({"retrievers": [{"name": "d", "data": "d"}]}, f"retrievers.0.kind: Field required; valid kinds: {KINDS}"),
        (minimal(colour="red"), "retrievers.0.colour: Extra inputs are not permitted"),
        (minimal(hops=3), "retrievers.0.hops: `hops` applies to kind 'graph' only, not 'keyword'"),
        (minimal(model="m"), "retrievers.0.model: `model` applies to kinds 'dense' and 'graph' only, not 'keyword'"),
        (minimal(kind="graph", text_field="body"),
         "retrievers.0.text_field: `text_field` applies to kinds 'dense', 'keyword' and 'synthetic' only, not 'graph'"),
        (minimal(batch={"hops": 1}), "retrievers.0.batch.hops: Extra inputs are not permitted"),
        (minimal(kind="dense", index="ivf"), "retrievers.0.index: Input should be 'flat' or 'hnsw'"),
        (minimal(kind="graph", hops=9), "retrievers.0.hops: Input should be less than or equal to 4"),
        (minimal(ray_actor_options={"num_cpus": -1}), "retrievers.0.ray_actor_options.num_cpus"),
        (minimal(ray_actor_options={"memory": "lots"}), "retrievers.0.ray_actor_options.memory"),
        (minimal(name="Bad Name"), "retrievers.0.name"),
        ({"retrievers": []}, "retrievers"),
        ({"retriever": []}, "retriever"),
        ({**minimal(), "fusion": {"k": 0}}, "fusion.k"),
    ],
)
def test_an_invalid_config_names_the_bad_key(raw, names):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=Path("."), source="my.yaml")
    assert names in info.value.message
    assert "my.yaml" in info.value.message
    for kind in ("dense", "keyword", "graph", "synthetic"):  # the union's tag stays out of the key's path
        assert f".{kind}." not in info.value.message


def test_duplicate_and_reserved_names_are_rejected():
    raw = {"retrievers": [minimal()["retrievers"][0], minimal()["retrievers"][0]]}
    with pytest.raises(ConfigError, match="repeated: docs"):
        parse_config(raw, base_dir=Path("."))
    with pytest.raises(ConfigError, match="reserved"):
        parse_config(minimal(name="gateway"), base_dir=Path("."))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrievers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_ragfan_disabled_env_overrides_the_file(monkeypatch):
    monkeypatch.setenv("RAGFAN_DISABLED", "true")
    assert load_config().enabled is False
    monkeypatch.setenv("RAGFAN_DISABLED", "0")
    assert load_config().enabled is True


def test_scaling_options_choose_replicas_or_autoscaling():
    config = load_config(DEFAULT_CONFIG)
    assert config.retriever("corpus").serve_options() == {
        "max_ongoing_requests": 32, "max_queued_requests": -1, "num_replicas": 1
    }
    keyword = config.retriever("keyword").serve_options()
    assert keyword["autoscaling_config"]["max_replicas"] == 2 and "num_replicas" not in keyword
    gateway = config.gateway.serve_options()
    assert gateway["max_queued_requests"] == 200
    assert gateway["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}


def test_spec_carries_kind_specific_parameters(tmp_path):
    spec = parse_config(
        {"retrievers": [{"name": "g", "kind": "graph", "data": "t.jsonl", "aliases": "a.json", "hops": 3}]},
        base_dir=tmp_path,
    ).retrievers[0].spec(tmp_path / "cache")
    assert spec.options == GraphOptions(hops=3, aliases=tmp_path / "a.json")
    assert spec.cache_dir == tmp_path / "cache"
    assert spec.kind == "graph" and spec.shared_encoder and not spec.needs_model


@pytest.mark.parametrize(
    ("raw", "options"),
    [
        ({"kind": "dense"}, DenseOptions()),
        ({"kind": "dense", "index": "hnsw", "encoder": "local", "text_field": "body"},
         DenseOptions(index="hnsw", encoder="local", text_field="body")),
        ({"kind": "keyword", "language": "german"}, KeywordOptions(language="german")),
        ({"kind": "graph"}, GraphOptions()),
        ({"kind": "synthetic", "delay_ms": 5, "fail": "always"}, SyntheticOptions(delay_ms=5, fail="always")),
    ],
)
def test_each_kind_has_its_own_options_and_defaults(raw, options):
    r = parse_config({"retrievers": [{"name": "r", "data": "d.jsonl", **raw}]}, base_dir=Path(".")).retrievers[0]
    assert r.options() == options
    assert r.spec(None).options == options
    assert r.spec(None).needs_model == (getattr(options, "encoder", None) == "local")


def test_a_spec_opens_with_its_typed_options(tmp_path):
    from actors.factory import open_retriever
    from actors.types import Query

    (tmp_path / "d.jsonl").write_text('{"id": "a", "body": "running shoes"}\n{"id": "b", "body": "tea cups"}\n')
    raw = {"retrievers": [
        {"name": "k", "kind": "keyword", "data": "d.jsonl", "text_field": "body", "language": "english"},
        {"name": "s", "kind": "synthetic", "data": "d.jsonl", "text_field": "body", "fail": "always"},
    ]}
    keyword, synthetic = (open_retriever(r.spec(None)) for r in parse_config(raw, base_dir=tmp_path).retrievers)
    [hits] = keyword.search([Query("run", top_k=1)])  # stemmed: `run` finds `running`
    assert [h.doc_id for h in hits] == ["a"]
    with pytest.raises(RetrieverFailed, match="configured to fail"):
        synthetic.search([Query("tea", top_k=1)])


def test_batch_options_default_and_bounds():
    raw = {"retrievers": [{"name": "s", "kind": "synthetic", "data": "d.jsonl"}]}
    batch = parse_config(raw, base_dir=Path(".")).retrievers[0].batch
    assert (batch.max_batch_size, batch.batch_wait_timeout_s, batch.max_concurrent_batches) == (32, 0.01, 1)
    raw["retrievers"][0]["batch"] = {"max_concurrent_batches": 0}
    with pytest.raises(ConfigError, match=r"retrievers.0.batch.max_concurrent_batches"):
        parse_config(raw, base_dir=Path("."))


def test_parse_bytes():
    assert parse_bytes("1GiB") == 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1000) == 1000
    with pytest.raises(ValueError):
        parse_bytes("1 parsec")


def test_custom_resources_pass_straight_to_ray_actor_options():
    raw = minimal(ray_actor_options={"num_cpus": 0.3, "resources": {"dense": 1}})
    options = parse_config(raw, base_dir=Path(".")).retrievers[0].ray_actor_options
    assert options.to_ray() == {"num_cpus": 0.3, "num_gpus": 0, "resources": {"dense": 1}}
    assert "resources" not in parse_config(minimal(), base_dir=Path(".")).retrievers[0].ray_actor_options.to_ray()


@pytest.mark.parametrize(
    ("resources", "message"),
    [({"CPU": 1}, "not a custom resource"), ({"dense": -1}, "must be >= 0"), ({"dense": "lots"}, "valid number")],
)
def test_invalid_custom_resources_are_rejected(resources, message):
    with pytest.raises(ConfigError, match="retrievers.0.ray_actor_options.resources") as info:
        parse_config(minimal(ray_actor_options={"resources": resources}), base_dir=Path("."))
    assert message in info.value.message


def test_a_field_a_model_declares_again_keeps_the_bounds_it_had():
    """An override of a parent's field (a new default, say) must not drop the parent's constraints:
    `gateway: {max_ongoing_requests: 0}` once passed validation and failed later, inside Serve."""
    import inspect

    from pydantic import BaseModel

    from actors import spec
    from serve_app import config as config_module
    from serve_app import schemas

    lost = []
    for module in (config_module, schemas, spec):
        for model in (m for m in vars(module).values() if inspect.isclass(m) and issubclass(m, BaseModel)):
            for name, field in model.model_fields.items():
                for parent in (p for p in model.__mro__[1:] if isinstance(p, type) and issubclass(p, BaseModel)):
                    bounds = parent.model_fields.get(name)
                    if bounds is not None and not set(bounds.metadata) <= set(field.metadata):
                        lost.append(f"{model.__name__}.{name} drops {parent.__name__}'s {bounds.metadata}")
    assert not lost


@pytest.mark.parametrize("where", ["gateway", "encoder", "retriever"])
def test_every_deployment_setting_the_config_accepts_serve_accepts_too(where):
    """Whatever passes ragfan's validation builds as a Serve app: a bad value is a ConfigError naming its
    key, never a traceback from Serve's DeploymentConfig once the cluster is up."""
    from serve_app.app import app_from_config

    settings = [
        (key, value)
        for key in ("max_ongoing_requests", "max_queued_requests", "num_replicas")
        for value in (-2, -1, 0, 1, 2, 0.5)
    ] + [
        ("autoscaling_config", value)
        for value in ({"max_replicas": 0}, {"min_replicas": 3, "max_replicas": 2}, {"min_replicas": -1},
                      {"max_replicas": 2, "target_ongoing_requests": 0}, {"min_replicas": 0, "max_replicas": 2})
    ] + [
        ("ray_actor_options", {key: value}) for key in ("num_cpus", "num_gpus", "memory") for value in (-1, 0, 1)
    ]
    for key, value in settings:
        raw = {"retrievers": [{"name": "d", "kind": "dense", "data": "d.jsonl"}]}
        target = raw["retrievers"][0] if where == "retriever" else raw.setdefault(where, {})
        target[key] = value
        try:
            config = parse_config(raw, base_dir=Path("."), source="my.yaml")
        except ConfigError as exc:
            prefix = "retrievers.0" if where == "retriever" else where
            assert f"{prefix}.{key}" in exc.message, (key, value, exc.message)
            continue
        app_from_config(config, api_keys=[])  # Serve checks each deployment's options here


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_encoder_backend_reaches_the_encoder_deployment(backend):
    from serve_app.app import app_from_config

    config = parse_config({"encoder": {"backend": backend, "placement": "deployment"},
                           "retrievers": [{"name": "d", "kind": "dense", "data": "d.jsonl"}]}, base_dir=Path("."))
    gateway = app_from_config(config, api_keys=[])._bound_deployment
    encoder = gateway.init_args[2]["default"]._bound_deployment  # the gateway's encoders, by model
    assert encoder.init_kwargs["backend"] == backend


def test_with_the_encoder_in_the_gateway_the_app_runs_no_encoder_deployment_and_the_gateway_declares_its_cpus():
    from serve_app.app import app_from_config
    from serve_app.apply import deployments

    raw = {"gateway": {"ray_actor_options": {"num_cpus": 0.2, "memory": "256MiB"}},
           "encoder": {"ray_actor_options": {"num_cpus": 0.5, "memory": "1GiB"}},
           "retrievers": [{"name": "d", "kind": "dense", "data": "d.jsonl"},
                          {"name": "e", "kind": "dense", "data": "e.jsonl", "model": "sentence-transformers/other"}]}
    apart = parse_config(raw | {"encoder": raw["encoder"] | {"placement": "deployment"}}, base_dir=Path("."))
    inside = parse_config(raw, base_dir=Path("."))
    assert inside.encoder.placement == "gateway"  # the default
    assert apart.encoder_deployments == apart.shared_models == inside.shared_models
    assert len(inside.shared_models) == 2 and inside.encoder_deployments == []
    assert apart.gateway_actor_options() == apart.gateway.ray_actor_options
    options = inside.gateway_actor_options()  # its own, and the encoder's for each of the two models
    assert options.num_cpus == pytest.approx(0.2 + 2 * 0.5) and options.memory == 2**28 + 2 * 2**30
    assert inside.gateway.ray_actor_options.num_cpus == 0.2  # the config itself is left as written
    assert {"encoder", "d", "e"} <= deployments(apart) and not any(n.startswith("encoder") for n in deployments(inside))
    assert "stats" not in deployments(apart)  # the hub (`versions`) holds the stats of an enabled app
    gateway = app_from_config(inside, api_keys=[])._bound_deployment
    assert gateway.init_args[2] == {}  # no encoder handles: the replica builds its own GatewayEncoders
    assert gateway._deployment_config.user_config["config"]["encoder"]["placement"] == "gateway"
    assert gateway.ray_actor_options["num_cpus"] == pytest.approx(1.2)
