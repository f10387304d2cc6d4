"""The asyncssh internals ``ssh/wire.py`` and ``ssh/algorithms.py`` bend, checked one by one.

sandtrap answers like sshd only because it replaces a few private methods of each connection and adds to
asyncssh's kex and auth registries. An asyncssh upgrade that renames or reshapes any of them fails here,
by name, before the fingerprint test (``tests/integration/test_sshd_fingerprint.py``) shows what broke.
No sockets: the source and signatures of asyncssh as installed.
"""

from __future__ import annotations

import inspect
import re

import asyncssh
import asyncssh.auth
import asyncssh.connection
import asyncssh.kex
import asyncssh.kex_dh
import pytest
from asyncssh.packet import SSHPacket

from sandtrap.ssh.algorithms import SNTRUP761_KEX_ALGS, SNTRUP761Server
from sandtrap.ssh.wire import HOSTBOUND_METHOD, HostBoundPublicKeyAuth

CONNECTION = asyncssh.connection.SSHConnection
SERVER_CONNECTION = asyncssh.connection.SSHServerConnection

# Per-connection methods wire.py replaces or calls, with the parameters it relies on.
METHODS = {
    "_recv_version": [],
    "_recv_packet": [],
    "_recv_pkthdr": [],
    "_force_close": ["exc"],
    "_send": ["data"],
    "_send_disconnect": ["code", "reason", "lang"],
    "_send_ext_info": [],
    "_get_extra_kex_algs": [],
    "data_received": ["data", "datatype"],
    "send_packet": ["pkttype", "args", "handler"],
}
# Attributes read or written, each assigned in SSHConnection.__init__.
ATTRIBUTES = (
    "_transport",
    "_inpbuf",
    "_packet",
    "_pktlen",
    "_recv_handler",
    "_recv_blocksize",
    "_recv_seq",
    "_recv_encryption",
    "_next_recv_encryption",
    "_send_encryption",
    "_client_version",
    "_client_kexinit",
    "_strict_kex",
    "_kex",
    "_auth_complete",
    "_extensions_to_send",
)


@pytest.mark.parametrize("name", list(METHODS))
def test_connection_methods_are_there_with_their_parameters(name: str) -> None:
    method = getattr(SERVER_CONNECTION, name, None)
    assert callable(method), f"asyncssh's connections no longer have {name}: ssh/wire.py must follow"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert params == METHODS[name], f"{name}{tuple(params)} changed: ssh/wire.py must follow"


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_connection_attributes_are_set_in_init(name: str) -> None:
    source = inspect.getsource(CONNECTION.__init__)
    assert re.search(rf"self\.{name}\b[^=\n]*=", source), f"SSHConnection.__init__ no longer sets {name}"


def test_receive_path_is_the_one_wire_py_mirrors() -> None:
    """wire.py takes a plain packet out of ``_packet``/``_inpbuf`` itself, as ``_recv_packet`` does."""
    recv_packet = inspect.getsource(CONNECTION._recv_packet)
    assert "rem = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize" in recv_packet
    assert "packet_data = self._packet[4:] + rest" in recv_packet
    assert "self._recv_handler = self._recv_packet" in inspect.getsource(CONNECTION._recv_pkthdr)
    finish = inspect.getsource(CONNECTION._finish_recv_packet)
    assert "self._recv_seq = (seq + 1) & 0xffffffff" in finish and "self._recv_handler = self._recv_pkthdr" in finish
    recv_data = inspect.getsource(CONNECTION._recv_data)
    assert "self._send_disconnect(exc.code, exc.reason, exc.lang)" in recv_data
    assert "self._force_close(exc)" in recv_data


def test_ext_info_is_built_from_extensions_to_send() -> None:
    assert "self._extensions_to_send.items()" in inspect.getsource(CONNECTION._send_ext_info)
    assert "b'server-sig-algs'" in inspect.getsource(CONNECTION.send_newkeys)


def test_server_host_key_and_public_key_validation_for_hostbound_auth() -> None:
    assert callable(SERVER_CONNECTION.get_server_host_key)
    params = list(inspect.signature(SERVER_CONNECTION.validate_public_key).parameters)
    assert params == ["self", "username", "key_data", "msg", "signature"]
    assert callable(SSHPacket.get_consumed_payload)
    assert asyncssh.auth.MSG_USERAUTH_PK_OK == 60


def test_hostbound_method_is_served_but_not_listed() -> None:
    """sshd treats it as a synonym of publickey: usable, never named in USERAUTH_FAILURE."""
    assert asyncssh.auth._server_auth_handlers[HOSTBOUND_METHOD] is HostBoundPublicKeyAuth
    assert HOSTBOUND_METHOD not in asyncssh.auth._auth_methods
    assert "_server_auth_handlers.get(method)" in inspect.getsource(asyncssh.auth.lookup_server_auth)
    assert "for method in _auth_methods" in inspect.getsource(asyncssh.auth.get_supported_server_auth_methods)
    server_auth = inspect.signature(asyncssh.auth.ServerAuth.__init__).parameters
    assert list(server_auth) == ["self", "conn", "username", "method", "packet"]


def test_sntrup761_is_registered_for_servers_only() -> None:
    for alg in SNTRUP761_KEX_ALGS:
        assert alg.encode() in asyncssh.kex.get_kex_algs()
        handler, _hash, args = asyncssh.kex._kex_handlers[alg.encode()]
        assert handler is asyncssh.kex_dh._KexHybridECDH
        assert args[0] is SNTRUP761Server or asyncssh.crypto.sntrup_available  # liboqs's own, if present
    params = list(inspect.signature(asyncssh.kex_dh._KexHybridECDH.__init__).parameters)
    assert params[:7] == ["self", "alg", "conn", "hash_alg", "pq_class", "pq_alg_name", "ecdh_class"]
    server_shared = inspect.getsource(asyncssh.kex_dh._KexHybridECDH._compute_server_shared)
    assert "self._pq.encaps(pq_pub)" in server_shared
    assert "self._pq.pubkey_bytes" in server_shared
    assert list(inspect.signature(asyncssh.kex.register_kex_alg).parameters) == [
        "alg",
        "handler",
        "hash_alg",
        "args",
        "default",
    ]


def test_group_exchange_handler_is_sshds() -> None:
    from sandtrap.ssh.algorithms import GEX_ALG, SshdGroupExchange

    handler, _hash, _args = asyncssh.kex._kex_handlers[GEX_ALG]
    assert handler is SshdGroupExchange and issubclass(handler, asyncssh.kex_dh._KexDHGex)
    base = inspect.getsource(asyncssh.kex_dh._KexDHGex._process_request)
    assert "self._gex_data = packet.get_remaining_payload()" in base and "self._init_group(g, p)" in base
    assert "self.send_packet(self._group_type, MPInt(p), MPInt(g))" in base
    for n in (14, 15, 16, 17, 18):
        assert getattr(asyncssh.kex_dh, f"_group{n}_g") == 2
