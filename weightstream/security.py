"""Who may reach an endpoint: owner-only ipc directories, CURVE for tcp.

An ``ipc://`` socket lives in a directory created 0700, so only the owner's
processes can connect. A ``tcp://`` endpoint is reachable from the network, so
it must be encrypted and authenticated with ZMQ CURVE unless the user says
``insecure=True`` explicitly.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from .protocol.errors import ConfigError, WeightstreamError


@dataclass(frozen=True)
class CurveKeys:
    """A Z85-encoded CURVE key pair (40-byte public and secret keys)."""

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        check_curve_key("CurveKeys.public", self.public)
        check_curve_key("CurveKeys.secret", self.secret)

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def check_curve_key(what: str, key: Any) -> None:
    """A CURVE key as libzmq takes it: 40 bytes of Z85 text, or the 32 raw bytes."""
    if isinstance(key, bytes) and len(key) == 32:
        return
    if isinstance(key, bytes) and len(key) == 40:
        try:
            z85.decode(key)
            return
        except (KeyError, ValueError, IndexError):  # a byte outside Z85's alphabet: named below
            pass
    got = f"{type(key).__name__} of {len(key)}" if isinstance(key, (bytes, str)) else type(key).__name__
    raise ConfigError(
        f"{what}: expected a CURVE key (40 bytes of Z85, or 32 raw bytes), got {got}; "
        "fix: use the keys of CurveKeys.generate() (a str key: .encode() it)"
    )


def needs_network_security(endpoint: str) -> bool:
    return not endpoint.startswith(("ipc://", "inproc://"))


def check_network_endpoint(endpoint: str, has_curve: bool, insecure: bool) -> None:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigError(
            f"endpoint {endpoint!r} has no scheme; expected ipc:///path/to/socket (same host) or tcp://host:port, "
            f"e.g. ipc:///tmp/ws-{os.getuid()}/gpu0.sock (a directory of your own)"
        )
    if needs_network_security(endpoint) and not has_curve and not insecure:
        raise ConfigError(
            f"{endpoint} is reachable over the network but no CURVE keys were given; pass "
            "curve_keys=CurveKeys.generate() on the sender (and its public key as server_key= plus "
            "curve_keys= on each receiver), or insecure=True to accept plain TCP on a trusted network"
        )
    if has_curve and not zmq.has("curve"):
        raise WeightstreamError("this libzmq has no CURVE support; install pyzmq's bundled libzmq (pip install pyzmq)")


def prepare_ipc_endpoint(endpoint: str, insecure: bool = False) -> None:
    """Create an ipc endpoint's directory 0700 (whatever the umask); refuse one others can reach.

    Both sides call it before they bind or connect: a rank that connected through a directory
    another user controls would load whatever that user's sender pushes.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    if path.startswith("@"):  # Linux abstract namespace: no directory, so anyone on the host can bind it
        if insecure:
            return
        raise ConfigError(
            f"{endpoint} is an abstract unix socket: any local user can bind or reach it, and no permission "
            "protects it; use a path in a directory of yours (e.g. ipc:///tmp/ws-<uid>/gpu0.sock), or pass "
            "insecure=True on a host whose users you trust"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not insecure:  # before creating anything below them
        _check_ancestors(directory)
    _makedirs_private(directory)
    if insecure:
        return
    st = os.stat(directory)
    problems = []
    if st.st_uid != os.getuid():
        problems.append(f"it is owned by uid {st.st_uid}, not by this process's uid {os.getuid()}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"its mode {stat.S_IMODE(st.st_mode):o} lets other users in (expected 700)")
    if problems:
        raise ConfigError(
            f"ipc directory {directory} is not private: {'; '.join(problems)}. Another user could bind a sender "
            f"there or connect to yours. Use a fresh directory of yours (e.g. ipc:///tmp/ws-{os.getuid()}/gpu0.sock), "
            "chmod 700 it, or pass insecure=True"
        )


def _check_ancestors(directory: str) -> None:
    """Every existing directory above the endpoint's must be yours or root's, and not writable by
    others unless sticky (like /tmp): else another user could swap the endpoint's directory for
    one of theirs after the check."""
    path = os.path.dirname(directory)
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid not in (os.getuid(), 0) or (mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX):
                raise ConfigError(
                    f"ipc endpoint directory {directory} lies under {path} (owner uid {st.st_uid}, mode {mode:o}), which "
                    "another user can change: they could replace the endpoint's directory with one of theirs. Put the "
                    f"endpoint under a directory of yours (e.g. ipc:///tmp/ws-{os.getuid()}/gpu0.sock), or pass "
                    "insecure=True"
                )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _makedirs_private(directory: str) -> None:
    """``os.makedirs(directory)``, each directory it creates set to 0700 whatever the umask."""
    missing = []
    head = directory
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile by the other side: the ownership check sees it
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


def apply_server_curve(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def apply_client_curve(sock: zmq.Socket[Any], keys: CurveKeys, server_key: bytes) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def start_authenticator(ctx: zmq.Context[Any], allowed_clients: Iterable[bytes] | None) -> object:
    """Run ZAP so only listed client public keys (or any CURVE client) get in."""
    from zmq.auth import CURVE_ALLOW_ANY
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    if allowed_clients is None:
        auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
    else:
        allowed = set(allowed_clients)

        class _Keys:
            def callback(self, domain: str, key: bytes) -> bool:
                return zmq.utils.z85.encode(key) in allowed if len(key) == 32 else key in allowed

        auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
    return auth


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc endpoint (None for other endpoints and abstract sockets)."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return endpoint[len("ipc://"):]


def refuse_live_ipc_endpoint(endpoint: str, who: str, rule: str) -> None:
    """libzmq binds over an existing socket file silently, stealing a live peer's endpoint.
    A file that accepts a connection belongs to a live ``who``: refuse. A stale one (its owner
    died) refuses the connection, and the bind replaces it."""
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):  # libzmq's bind would delete it
        raise ConfigError(
            f"{endpoint}: {path} exists and is not a socket; a bind there would replace it; fix: an endpoint path "
            "that names nothing yet (or a socket file left by a process that died)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError:
        return  # ECONNREFUSED (stale), or not a socket: libzmq's bind says what is wrong
    finally:
        probe.close()
    raise WeightstreamError(
        f"another {who} is bound at {endpoint} (its socket accepts connections); {rule}: close the other one "
        "first, or give this one its own endpoint"
    )


@dataclass(frozen=True)
class SocketFile:
    """The ipc socket file a bind made, known by inode: closing removes that file only, never one
    a successor bound at the same path since."""

    path: str
    dev: int
    ino: int

    @classmethod
    def bound_at(cls, endpoint: str) -> SocketFile | None:
        path = ipc_path(endpoint)
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(path, st.st_dev, st.st_ino)

    def remove(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)
        except OSError:
            pass
