"""`ragfan apply`: apply a changed config to the running app, and say what Serve restarted.

Serve compares each deployment's code version (`serve_app.app._versioned`: ragfan's code and the
arguments its replicas start from) and options with what runs:

    change                                   what happens                                   searches
    a retriever's deadline, weight, top_k,   the gateway's `reconfigure()`: no replica        none lost
      filters, breaker; fusion; the cache      restarts; its lanes are rebuilt for the
                                               retrievers that changed
    a replica count, autoscaling             scaled; no replica restarts                      none lost
    a retriever added                        its deployment starts; the gateway reaches it    none lost; it answers
                                               by name                                         once it is up
    a retriever removed                      the gateway drops it; Serve stops its replicas   none lost
    a retriever's data, kind options,        that retriever's replicas restart, one share      its answers degrade
      resources or batch settings              at a time (Serve stops an old replica before     (timeout) while a
                                               it starts the new one)                          one-replica one starts
    the gateway's own settings or API keys   the gateway's replicas restart likewise           HTTP waits for it
                                                                                               (docs/RELOAD.md)

`apply` records each deployment's replicas before and after, so its report names what was kept,
restarted, started and stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.config import AppConfig

STOP_WAIT_S = 60.0  # how long `apply` waits for the replicas of removed deployments to stop


@dataclass(frozen=True)
class Applied:
    """Per deployment, its replica ids before and after the change."""

    before: dict[str, set[str]]
    after: dict[str, set[str]]
    seconds: float

    def lines(self) -> list[str]:
        out = []
        for name in sorted(set(self.before) | set(self.after)):
            old, new = self.before.get(name, set()), self.after.get(name, set())
            if not old:
                what = f"started ({len(new)} replica{'s' if len(new) != 1 else ''})"
            elif not new:
                what = "stopped"
            elif old == new:
                what = f"kept ({len(new)} replica{'s' if len(new) != 1 else ''})"
            elif old & new:
                what = f"scaled from {len(old)} to {len(new)} replicas, {len(old & new)} kept"
            else:
                what = f"restarted ({len(new)} new replica{'s' if len(new) != 1 else ''})"
            out.append(f"  {name:<20} {what}")
        return out


def replicas(app: str) -> dict[str, set[str]]:
    """Each deployment of `app` and the ids of its live replicas, from the names of their actors."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    found: dict[str, set[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            deployment, _, replica = actor["name"][len(prefix):].partition("#")
            found.setdefault(deployment, set()).add(replica)
    return found


def apply(config: AppConfig, *, api_keys: list[str] | None = None, route_prefix: str = "/") -> Applied:
    """Deploy `config` over the app of the same name on the Ray cluster this process joined; returns
    once Serve reports it running. Embeds what the index cache lacks first, as `ragfan serve` does."""
    import time

    from ray import serve

    from serve_app.app import app_from_config, prepare_indexes

    before = replicas(config.app_name)
    prepare_indexes(config)
    started = time.perf_counter()
    serve.run(app_from_config(config, api_keys), name=config.app_name, route_prefix=route_prefix)
    # Serve reports the app running while the replicas of a deployment it removed still stop.
    wanted = deployments(config)
    after = replicas(config.app_name)
    while set(after) - wanted and time.perf_counter() - started < STOP_WAIT_S:
        time.sleep(0.2)
        after = replicas(config.app_name)
    return Applied(before, after, round(time.perf_counter() - started, 2))


def deployments(config: AppConfig) -> set[str]:
    """The names of the deployments the app of `config` runs."""
    from actors.encoder import encoder_name

    names = {"gateway"}
    if not config.enabled and config.gateway.metrics:  # an enabled app's hub (`versions`) holds the stats
        names.add("stats")
    if config.enabled:
        names |= {"versions", *(encoder_name(m) for m in config.encoder_deployments),
                  *(d for r in config.retrievers for d in r.deployment_names())}
    return names
