"""`medforge-operator`: settings from the environment and flags, then kopf's main loop."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys

import kopf
from prometheus_client import REGISTRY, start_http_server

from medforge_common.redact import install_log_redaction
from medforge_operator import handlers, metrics
from medforge_operator.catalog import Catalog
from medforge_operator.domain_metrics import DomainCollector
from medforge_operator.kube import Kube, load_config
from medforge_operator.settings import SettingsError, load
from medforge_operator.store import ForgeStore

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def few_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives threads that allocate at once arenas of their own (up to eight per core),
    and each keeps what was freed in it: the operator's reconcile, watch and HTTP threads held
    hundreds of MiB after a burst of rounds. A process that mostly waits on the API server
    needs two. False (nothing changed) on other C libraries."""
    if platform.libc_ver()[0] != "glibc" or (name := ctypes.util.find_library("c")) is None:
        return False
    return bool(ctypes.CDLL(name).mallopt(M_ARENA_MAX, arenas))


def main(argv: list[str] | None = None) -> int:
    few_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    install_log_redaction()  # no presigned query in the operator's log, whoever logs it
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
