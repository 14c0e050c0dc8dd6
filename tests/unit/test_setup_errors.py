"""Set-up problems are reported as what is missing and how to fix it, not as tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from medforge_localcluster import binaries, pki
from medforge_localcluster.cli import main
from medforge_localcluster.errors import SetupError


def test_missing_go_toolchain_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no go, no kube-apiserver
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("MEDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SetupError) as err:
        binaries.ensure(["kube-apiserver"], log=False)
    assert "Go toolchain" in err.value.message
    assert "KUBEBUILDER_ASSETS" in err.value.hint


def test_cli_prints_the_reason_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("MEDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["localcluster", "build"]) == 2
    err = capsys.readouterr().err
    assert "Go toolchain" in err and "fix:" in err and "Traceback" not in err


def test_kubeapiserver_found_in_kubebuilder_assets_must_be_recent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = tmp_path / "kube-apiserver"
    old.write_text("#!/bin/sh\necho 'Kubernetes v1.28.3'\n")
    old.chmod(0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("MEDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    assert binaries.find("kube-apiserver") is None
    old.write_text("#!/bin/sh\necho 'Kubernetes v1.35.4'\n")
    assert binaries.find("kube-apiserver") == old


def test_pki_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    pki.ensure_pki(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.crt").read_bytes())
    for name in ("apiserver", "kubelet", "apiserver-kubelet-client"):
        cert = x509.load_pem_x509_certificate((tmp_path / "pki" / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises if the signature does not chain
    served = x509.load_pem_x509_certificate((tmp_path / "pki" / "apiserver.crt").read_bytes())
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    tokens = (tmp_path / "pki" / "tokens.csv").read_text().splitlines()
    assert len(tokens) == len(pki.IDENTITIES)
    assert oct((tmp_path / "pki" / "tokens.csv").stat().st_mode & 0o777) == "0o600"
    before = pki.token(tmp_path / "pki", "admin")
    pki.ensure_pki(tmp_path / "pki")  # idempotent: tokens stay stable
    assert pki.token(tmp_path / "pki", "admin") == before
