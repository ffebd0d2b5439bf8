"""A daemon's status over a local socket: ``ReceiverDaemon(status_endpoint=...)`` and
``weightstream status ENDPOINT``.

The daemon binds a ROUTER at an ``ipc://`` path (under the same ownership checks as its main
endpoint: a directory only its user can reach) and answers each request with what
``daemon.status`` says, plus the rank's identity and its last versions' timings. Requests and
replies are msgpack maps, bounded in size and decoded strictly; nothing is pickled.

    client                              daemon
    {"type": "STATUS", "v": 1}   ──►
                                  ◄──   {"type": "STATUS", "v": 1, "status": {...}}
                                        (or {"type": "ERROR", "v": 1, "error": "..."})
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from ..protocol.errors import ConfigError, PeerTimeout, ProtocolError, WeightstreamError
from ..security import SocketFile, ipc_path, prepare_ipc_endpoint, refuse_live_ipc_endpoint
from .state import DaemonStatus

__all__ = ["STATUS_VERSION", "StatusServer", "check_status_endpoint", "query_status", "status_dict"]

log = logging.getLogger("weightstream.receiver")

STATUS_VERSION = 1
_MAX_REQUEST = 256  # bytes: a request is a two-key map
_MAX_REPLY = 1 << 20  # bytes: a status with its last versions is a few KiB


def check_status_endpoint(endpoint: object, main_endpoint: str, insecure: bool) -> str:
    """``status_endpoint=``: an ipc path of its own, in a directory only this user can reach."""
    if not isinstance(endpoint, str) or not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
        raise ConfigError(
            f"status_endpoint={endpoint!r}: expected an ipc:// endpoint (a local socket; the status is not served over "
            f"the network), e.g. ipc:///tmp/ws-{os.getuid()}/rank0-status.sock"
        )
    if endpoint == main_endpoint:
        raise ConfigError(
            f"status_endpoint={endpoint!r} is the daemon's own endpoint; fix: give the status socket a path of its own"
        )
    prepare_ipc_endpoint(endpoint, insecure)
    return endpoint


def status_dict(status: DaemonStatus, **identity: Any) -> dict[str, Any]:
    """A status as plain msgpack-able values: the daemon's identity, then ``DaemonStatus``'s fields."""
    body = dataclasses.asdict(status)
    body["versions"] = [dataclasses.asdict(v) for v in status.versions]
    return {**identity, **body}


class StatusServer:
    """Answers status requests on the daemon's loop until closed."""

    def __init__(self, endpoint: str, describe: Callable[[], dict[str, Any]]) -> None:
        self.endpoint = endpoint
        self._describe = describe
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: Any = None
        self._file: SocketFile | None = None

    def bind(self) -> None:
        refuse_live_ipc_endpoint(self.endpoint, "daemon's status socket", "one daemon per status endpoint")
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST)  # libzmq drops a peer that sends more
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise ConfigError(f"status_endpoint={self.endpoint!r}: could not bind it ({exc})") from exc
        self._sock = sock
        self._file = SocketFile.bound_at(self.endpoint)

    async def serve(self) -> None:
        sock = self._sock
        while True:
            frames = await sock.recv_multipart(copy=True)
            if len(frames) < 2:
                continue
            ident, payload = frames[0], frames[-1]
            envelope = frames[1:-1]
            try:
                _check_request(payload)
                reply = {"type": "STATUS", "v": STATUS_VERSION, "status": self._describe()}
            except ProtocolError as exc:
                log.warning("status endpoint %s: refused a request: %s", self.endpoint, exc)
                reply = {"type": "ERROR", "v": STATUS_VERSION, "error": str(exc)}
            await sock.send_multipart([ident, *envelope, msgpack.packb(reply)])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._file is not None:
            self._file.remove()
            self._file = None


def _unpack(payload: bytes, limit: int, what: str) -> Any:
    if len(payload) > limit:
        raise ProtocolError(f"{what}: expected at most {limit} bytes, got {len(payload)}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:  # not msgpack, truncated, extra bytes, too deep
        raise ProtocolError(f"{what}: not one msgpack value ({type(exc).__name__}: {exc})") from None


def _check_request(payload: bytes) -> None:
    body = _unpack(payload, _MAX_REQUEST, "status request")
    if not isinstance(body, dict) or body.get("type") != "STATUS":
        raise ProtocolError(f"status request: field 'type': expected 'STATUS', got {str(body)[:60]!r}")
    if body.get("v") != STATUS_VERSION or type(body.get("v")) is not int:
        raise ProtocolError(f"status request: field 'v': expected {STATUS_VERSION}, got {body.get('v')!r}")


def query_status(endpoint: str, timeout: float = 5.0, *, insecure: bool = False) -> dict[str, Any]:
    """Ask the daemon serving ``status_endpoint=endpoint`` for its status (a dict: rank, state,
    committed_version, last_error, versions, ...). ``PeerTimeout`` if none answers in ``timeout``."""
    if not isinstance(endpoint, str) or not endpoint.startswith("ipc://"):
        raise ConfigError(f"status endpoint {endpoint!r}: expected the ipc:// endpoint a daemon was given as status_endpoint=")
    if not timeout > 0:
        raise ConfigError(f"timeout: expected > 0 seconds, got {timeout!r}")
    path = ipc_path(endpoint)
    if path is not None and not os.path.exists(path):
        raise WeightstreamError(
            f"no daemon serves {endpoint}: the socket file does not exist; fix: start the rank with "
            f"ReceiverDaemon(..., status_endpoint={endpoint!r})"
        )
    prepare_ipc_endpoint(endpoint, insecure)  # never ask through a directory another user controls
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REPLY)
        sock.connect(endpoint)
        sock.send(msgpack.packb({"type": "STATUS", "v": STATUS_VERSION}))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise PeerTimeout(
                f"no answer from {endpoint} within {timeout:.1f}s; is the rank's daemon running (and started with "
                "status_endpoint= this path)? A daemon whose loop is blocked also answers late"
            )
        reply = _unpack(sock.recv(), _MAX_REPLY, f"status reply from {endpoint}")
    finally:
        sock.close(linger=0)
        ctx.term()
    if not isinstance(reply, dict) or reply.get("v") != STATUS_VERSION:
        raise ProtocolError(f"status reply from {endpoint}: expected a map with 'v': {STATUS_VERSION}, got {str(reply)[:80]!r}")
    if reply.get("type") == "ERROR":
        raise ProtocolError(f"{endpoint} refused the status request: {reply.get('error')!r}")
    status = reply.get("status")
    if reply.get("type") != "STATUS" or not isinstance(status, dict):
        raise ProtocolError(f"status reply from {endpoint}: expected type 'STATUS' with a 'status' map, got {str(reply)[:80]!r}")
    return status
