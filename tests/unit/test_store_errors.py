"""An unreachable forge store is reported on the status, never as a crash: the real boto3
client against a loopback port where nothing listens."""

from __future__ import annotations

import pytest

from medforge_localcluster.processes import free_port
from medforge_operator import basemodel
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable, s3_uri


def test_unreachable_store_is_a_clear_retrying_status() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = ForgeStore(Settings(endpoint, "forge", "ak", "s3cr3t-key-value"))
    with pytest.raises(StoreUnreachable) as err:
        store.verify_artifact(s3_uri("s3://forge/base-models/clip/", "status.uri"), None)
    assert endpoint in str(err.value) and "unreachable" in str(err.value)
    assert "s3cr3t-key-value" not in str(err.value)  # no credentials in the message

    o = basemodel.Observation(1, "s3://forge/base-models/clip/", store_error=str(err.value))
    st = basemodel.compute_status({}, o)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert st["phase"] == "Pending" and ready["reason"] == "StoreUnreachable"
    assert ready["message"].endswith("retrying")  # a fault, retried: never a verdict
