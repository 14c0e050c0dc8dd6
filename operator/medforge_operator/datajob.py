"""Jobs that read a hospital's own data in its namespace (training, evaluation): the dataset's
wiring (its S3 credentials as secretKeyRef env vars, which the operator never reads, or its PVC
mounted read-only) and the Job around it (pure builders)."""

from __future__ import annotations

from typing import Any

from medforge_common.uris import PvcUri, parse_uri
from medforge_operator import basemodel, jobs
from medforge_operator.bodies import Obj
from medforge_operator.settings import Settings

JSON = dict[str, Any]
DATA_MOUNT = "/data"
SIGNING_DIR = "/var/run/medforge/signing"
SIGNING_KEY = f"{SIGNING_DIR}/private.pem"


def signing_wiring(spec: JSON) -> tuple[list[JSON], list[JSON]]:
    """(volumes, mounts) for the hospital's signing key (spec.signing.keySecretRef): that one
    Secret key, read-only, into the training Job only (evaluation Jobs never get it)."""
    ref = (spec.get("signing") or {}).get("keySecretRef")
    if not ref:
        return [], []
    item = {"key": ref.get("key", "private.pem"), "path": "private.pem"}
    volume = {
        "name": "signing-key",
        "secret": {"secretName": ref["name"], "items": [item], "defaultMode": 0o440},
    }
    return [volume], [{"name": "signing-key", "mountPath": SIGNING_DIR, "readOnly": True}]


def dataset_wiring(spec: JSON) -> tuple[JSON, list[JSON], list[JSON], list[JSON]]:
    """(dataset config, env, volumes, volume mounts) for the dataset: S3 credentials go through
    secretKeyRef env vars (the operator never reads them), a PVC is mounted read-only."""
    ds = spec["dataset"]
    uri = parse_uri(ds["uri"], "spec.dataset.uri")
    cfg: JSON = {"uri": ds["uri"], "validationFraction": ds.get("validationFraction", 0.2)}
    env: list[JSON] = []
    volumes: list[JSON] = []
    mounts: list[JSON] = []
    if isinstance(uri, PvcUri):
        volumes.append(
            {"name": "dataset", "persistentVolumeClaim": {"claimName": uri.claim, "readOnly": True}}
        )
        mounts.append({"name": "dataset", "mountPath": DATA_MOUNT, "readOnly": True})
        cfg["path"] = f"{DATA_MOUNT}/{uri.path}".rstrip("/")
    else:
        if ds.get("endpoint"):
            cfg["endpoint"] = ds["endpoint"]
        ref = ds.get("credentialsSecretRef")
        if ref:
            for var, key in (
                ("DATASET_AWS_ACCESS_KEY_ID", ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
                (
                    "DATASET_AWS_SECRET_ACCESS_KEY",
                    ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"),
                ),
            ):
                env.append(
                    {"name": var, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": key}}}
                )
            cfg["credentialsFromEnv"] = True
    return cfg, env, volumes, mounts


def data_job(
    owner: Obj,
    name: str,
    component: str,
    command: list[str],
    settings: Settings,
    base: basemodel.Resolved,
    labels: dict[str, str],
    backoff_limit: int,
    active_deadline: int | None,
    annotations: dict[str, str] | None = None,
    signing_key: bool = False,
) -> JSON:
    """The Job, owned by `owner` (whose spec names the dataset and resources), in its namespace:
    the BaseModel's training image and limits apply. Raises ValueError naming the field."""
    spec = owner["spec"]
    _, env, volumes, mounts = dataset_wiring(spec)
    if signing_key:
        key_volumes, key_mounts = signing_wiring(spec)
        volumes, mounts = volumes + key_volumes, mounts + key_mounts
    resources = basemodel.training_resources(
        spec.get("resources") or {}, base.training, "spec.resources"
    )
    return jobs.job_manifest(
        name=name,
        namespace=owner["metadata"]["namespace"],
        owner=owner,
        component=component,
        image=str(base.training.get("image") or settings.trainer_image),
        command=command,
        annotations={
            jobs.ANNOTATION_BASE_DIGEST: base.digest,
            jobs.ANNOTATION_BASE_NAME: base.name,
            **(annotations or {}),
        },
        env=env,
        labels=labels,
        resources=resources,
        volumes=volumes,
        volume_mounts=mounts,
        backoff_limit=backoff_limit,
        active_deadline=active_deadline,
        ttl_seconds=settings.job_ttl_seconds,
    )
