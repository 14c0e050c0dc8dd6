"""What a reconcile round needs of the API server, as a Protocol: `kube.Kube` implements it
against a real one, and the unit tests' fakes implement it too, checked by mypy (no casts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

JSON = dict[str, Any]


class KubeApi(Protocol):
    def get_object(self, plural: str, namespace: str, name: str, /) -> JSON | None: ...

    def list_objects(
        self, plural: str, namespace: str | None = None, selector: str = "", /
    ) -> list[JSON]: ...

    def iter_objects(
        self, plural: str, namespace: str | None = None, selector: str = "", /
    ) -> Iterable[JSON]: ...

    def namespace_labels(self, name: str, /) -> dict[str, str] | None: ...

    def get_job(self, namespace: str, name: str, /) -> JSON | None: ...

    def create_job(self, job: JSON, /) -> tuple[JSON, bool]: ...

    def list_jobs(self, namespace: str, selector: str, /) -> list[JSON]: ...

    def delete_job(self, namespace: str, name: str, /) -> None: ...

    def job_pods(self, namespace: str, job: JSON, /) -> list[JSON]: ...

    def apply_secret(self, secret: JSON, /) -> None: ...

    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: JSON,
        resource_version: str | None = None,
        /,
    ) -> None: ...
