"""A small Kubernetes REST client working on plain dicts.

The process kubelet handles thousands of pod events; plain JSON dicts (as the API server sends
them) are much cheaper than the generated client's model objects, and a watch is just a stream
of JSON lines.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
import yaml

JSON = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            self.reason = str(json.loads(body).get("reason", ""))
            self.message = str(json.loads(body).get("message", body))
        except (ValueError, AttributeError):
            self.reason, self.message = "", body
        super().__init__(f"{status} {self.reason}: {self.message}")


class Kube:
    def __init__(self, server: str, token: str, ca_file: str, pool_size: int = 16) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        ctx = ssl.create_default_context(cafile=ca_file)
        self.http = urllib3.PoolManager(
            maxsize=pool_size, block=False, ssl_context=ctx, retries=False
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, pool_size: int = 16) -> Kube:
        """Reads the token-based kubeconfigs the local cluster writes."""
        cfg = yaml.safe_load(path.read_text())
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".crt") as ca:
            ca.write(base64.b64decode(cluster["certificate-authority-data"]))
        return cls(cluster["server"], user["token"], ca.name, pool_size)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JSON:
        url = self.server + path + (("?" + urlencode(params)) if params else "")
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self.http.request(method, url, body=data, headers=headers, timeout=timeout)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.data.decode(errors="replace"))
        out: JSON = json.loads(resp.data) if resp.data else {}
        return out

    def list_metadata(self, path: str, **params: Any) -> list[JSON]:
        """A list of only the objects' metadata (PartialObjectMetadataList): cheap to poll."""
        url = self.server + path + (("?" + urlencode(params)) if params else "")
        headers = dict(self._headers)
        headers["Accept"] = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
        resp = self.http.request("GET", url, headers=headers, timeout=30.0)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.data.decode(errors="replace"))
        items: list[JSON] = json.loads(resp.data).get("items") or []  # null when empty
        return items

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def put(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: JSON, kind: str = "strategic-merge") -> JSON:
        return self.request("PATCH", path, body, content_type=f"application/{kind}-patch+json")

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[JSON]:
        """Yields watch events ({type, object}) until the server closes the stream."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        url = f"{self.server}{path}?{urlencode(params)}"
        resp = self.http.request(
            "GET",
            url,
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30),
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode(errors="replace"))
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()
