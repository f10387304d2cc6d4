"""``sandbox.docker``'s engine keys: a ``tcp://`` engine with mutual TLS (``tls_ca``, ``tls_cert``, ``tls_key``,
``tls_verify``), checked when the config is loaded; each error names the key and the fix. And how a TLS failure
is worded (:mod:`sandtrap.sandbox.docker.mtls`) and which client the settings give (:mod:`...engine`)."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sandtrap.config import load_settings
from sandtrap.errors import ConfigError
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.mtls import tls_context, tls_failure
from tls_pki import EnginePKI, make_pki

REMOTE = "tcp://192.0.2.10:2376"  # TEST-NET-1: never contacted, only parsed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> EnginePKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def docker(pki: EnginePKI, **keys: Any) -> dict[str, Any]:
    base = {
        "docker_host": REMOTE,
        "tls_ca": str(pki.ca),
        "tls_cert": str(pki.client.cert),
        "tls_key": str(pki.client.key),
        "disk_quota": 0,
    }
    return {k: v for k, v in {**base, **keys}.items() if v is not None}


def load(**sandbox: Any) -> Any:
    return load_settings(None, {"sandbox": sandbox, "network": {"mode": "none"}})


def error(**sandbox: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        load(**sandbox)
    return str(raised.value)


def test_a_remote_engine_with_its_three_files_loads(pki: EnginePKI) -> None:
    s = load(docker=docker(pki))
    d = s.sandbox.docker
    assert (d.docker_host, d.tls_verify, d.uses_tls) == (REMOTE, True, True)
    assert not engine.is_local(d) and engine.address(d) == REMOTE


@pytest.mark.parametrize("host", ["", "unix:///run/sandtrap/engine.sock", "tcp://127.0.0.1:2375", "tcp://[::1]:2375"])
def test_local_and_loopback_engines_need_no_tls(host: str) -> None:
    assert load(docker={"docker_host": host, "disk_quota": 0}).sandbox.docker.docker_host == host


@pytest.mark.parametrize("host", ["http://10.0.0.5:2375", "tcp://10.0.0.5", "ssh://root@10.0.0.5", "unix://relative"])
def test_an_address_that_is_neither_unix_nor_tcp_is_refused(host: str) -> None:
    text = error(docker={"docker_host": host})
    assert "sandbox.docker.docker_host: must be unix:///PATH" in text and "tcp://HOST:PORT" in text


def test_tcp_off_loopback_without_tls_is_refused_naming_the_keys() -> None:
    text = error(docker={"docker_host": REMOTE, "disk_quota": 0})
    assert text.count("sandbox.docker.docker_host") == 1, text
    assert "sandbox.docker.docker_host: tcp://192.0.2.10:2376 without TLS" in text
    assert "root on the engine's host" in text and "tls_ca, tls_cert and tls_key" in text


@pytest.mark.parametrize("key", ["tls_ca", "tls_cert", "tls_key"])
def test_a_missing_file_names_its_key(pki: EnginePKI, tmp_path: Path, key: str) -> None:
    text = error(docker=docker(pki, **{key: str(tmp_path / "nowhere.pem")}))
    assert f"sandbox.docker.{key}: " in text and "is not a file on this host" in text, text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_an_unreadable_file_names_its_key(pki: EnginePKI, tmp_path: Path) -> None:
    locked = tmp_path / "key.pem"
    locked.write_bytes(pki.client.key.read_bytes())
    locked.chmod(0)
    text = error(docker=docker(pki, tls_key=str(locked)))
    assert "sandbox.docker.tls_key: " in text and "cannot be read" in text, text


def test_a_relative_path_is_refused(pki: EnginePKI) -> None:
    text = error(docker=docker(pki, tls_ca="ca.pem"))
    assert "sandbox.docker.tls_ca: 'ca.pem' is not an absolute path" in text, text


def test_a_file_that_is_no_certificate_names_its_key(pki: EnginePKI) -> None:
    text = error(docker=docker(pki, tls_cert=str(pki.client.key)))  # the key where the certificate goes
    assert "sandbox.docker.tls_cert: " in text and "holds no PEM certificate" in text, text
    text = error(docker=docker(pki, tls_key=str(pki.client.cert)))
    assert "sandbox.docker.tls_key: " in text and "holds no PEM private key" in text, text


def test_a_key_that_is_not_the_certificates_is_refused(pki: EnginePKI) -> None:
    text = error(docker=docker(pki, tls_key=str(pki.other_client.key)))
    assert "sandbox.docker.tls_key: " in text and "is not the key of sandbox.docker.tls_cert" in text, text


def test_an_encrypted_key_is_refused(pki: EnginePKI, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), password=None)
    sealed = tmp_path / "sealed.pem"
    encryption = serialization.BestAvailableEncryption(b"secret")
    sealed.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    text = error(docker=docker(pki, tls_key=str(sealed)))
    assert "sandbox.docker.tls_key: " in text and "encrypted key" in text, text


@pytest.mark.parametrize("left_out", ["tls_ca", "tls_cert", "tls_key"])
def test_tls_needs_all_three_files(pki: EnginePKI, left_out: str) -> None:
    text = error(docker=docker(pki, **{left_out: None}))
    assert f"sandbox.docker.{left_out}: missing" in text, text


def test_without_verification_the_ca_may_be_left_out(pki: EnginePKI) -> None:
    d = load(docker=docker(pki, tls_ca=None, tls_verify=False)).sandbox.docker
    assert d.uses_tls and not d.tls_verify
    context = tls_context(d)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_tls_keys_with_a_local_engine_are_refused(pki: EnginePKI) -> None:
    text = error(docker=docker(pki, docker_host="unix:///var/run/docker.sock"))
    assert "sandbox.docker.tls_ca: TLS is for a tcp:// engine" in text, text


def test_the_disk_bound_cannot_be_kept_on_a_remote_engine(pki: EnginePKI) -> None:
    text = error(docker=docker(pki, disk_quota="256m"))
    assert "sandbox.docker.disk_quota: the boxes' writable layers are on the engine's host" in text
    assert "set sandbox.docker.disk_quota: 0" in text
    # Another backend only builds its image on that engine: its disk_quota is not used.
    assert load(backend="nspawn", docker=docker(pki, disk_quota="256m")).sandbox.backend == "nspawn"


def test_the_context_carries_the_client_certificate_and_trusts_only_the_ca(pki: EnginePKI) -> None:
    context = tls_context(load(docker=docker(pki)).sandbox.docker)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "sandtrap test ca"),),)]


async def test_the_client_speaks_https_to_a_tls_engine_and_http_to_a_loopback_one(pki: EnginePKI) -> None:
    tls = engine.connect(load(docker=docker(pki)).sandbox.docker)
    plain = engine.connect(load(docker={"docker_host": "tcp://127.0.0.1:2375", "disk_quota": 0}).sandbox.docker)
    try:
        assert tls.docker_host == "https://192.0.2.10:2376" and plain.docker_host == "http://127.0.0.1:2375"
    finally:
        await engine.close(tls)
        await engine.close(plain)


def test_docker_host_from_the_environment_off_loopback_without_tls_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", REMOTE)
    with pytest.raises(ConfigError, match=re.escape(f"DOCKER_HOST={REMOTE} without TLS")):
        engine.connect(load().sandbox.docker)


def test_tls_failures_name_the_key_to_fix() -> None:
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    assert "sandbox.docker.tls_ca" in tls_failure(untrusted)
    wrapped = RuntimeError("cannot connect")
    wrapped.__context__ = untrusted
    assert "unable to get local issuer certificate" in tls_failure(wrapped)
    refused = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    assert "sandbox.docker.tls_cert" in tls_failure(refused)
    assert "sandbox.docker.docker_host" in tls_failure(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version"))
    assert tls_failure(ConnectionRefusedError(111, "Connection refused")) == ""
