"""An unreachable forge store is reported on the status, never as a crash: the real boto3
client against a loopback port where nothing listens."""

from __future__ import annotations

import pytest

from medforge_localcluster.processes import free_port
from medforge_operator import contribution
from medforge_operator.settings import Settings
from medforge_operator.store import ForgeStore, StoreUnreachable, s3_uri


def test_unreachable_store_is_a_clear_retrying_status() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = ForgeStore(Settings(endpoint, "forge", "ak", "s3cr3t-key-value"))
    with pytest.raises(StoreUnreachable) as err:
        store.list_names(s3_uri("s3://forge/models/clip/", "spec.baseModel.uri"))
    assert endpoint in str(err.value) and "unreachable" in str(err.value)
    assert "s3cr3t-key-value" not in str(err.value)  # no credentials in the message

    o = contribution.Observation(1, "j", None, store_error=str(err.value))
    st = contribution.compute_status({}, o)
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert st["phase"] == "Pending" and stalled["reason"] == "StoreUnreachable"
    assert stalled["message"].endswith("retrying")
