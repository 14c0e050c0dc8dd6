"""`medforge-operator`: settings from the environment and flags, then kopf's main loop."""

from __future__ import annotations

import logging
import sys

import kopf
from prometheus_client import REGISTRY, start_http_server

from medforge_operator import handlers, metrics
from medforge_operator.catalog import Catalog
from medforge_operator.domain_metrics import DomainCollector
from medforge_operator.kube import Kube, load_config
from medforge_operator.settings import SettingsError, load
from medforge_operator.store import ForgeStore


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler run at INFO; our Events and status say what happened.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = load(argv)
    except SettingsError as exc:
        print(f"medforge-operator: {exc}", file=sys.stderr)
        return 2
    load_config()
    kube, store = Kube(settings.concurrency * 2), ForgeStore(settings)
    runtime = handlers.Runtime(settings, kube, store, Catalog(kube, store, settings))
    if settings.metrics_port:
        metrics.preset()
        REGISTRY.register(DomainCollector(runtime.observed, runtime.leading))
        start_http_server(settings.metrics_port, addr=settings.metrics_address)
    logging.getLogger("medforge.operator").info(
        "watching %s; store %s bucket %s",
        ", ".join(settings.namespaces) or "all namespaces",
        settings.store_endpoint,
        settings.store_bucket,
    )
    kopf.run(
        memo=kopf.Memo(runtime=runtime),  # every handler finds the runtime here
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
