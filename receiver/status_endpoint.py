"""A daemon's status over a local socket: ``ReceiverDaemon(status_endpoint=...)`` and
``weightstream status ENDPOINT``.

The daemon listens on a unix socket at an ``ipc://`` path (under the same ownership checks as
its main endpoint: a directory only its user can reach; the socket itself is made 0600) and
answers each connection's one request with what ``daemon.status`` says, plus the rank's
identity and its last versions' timings. A plain asyncio server on the daemon's loop, not
ZeroMQ: every read is bounded before it is made (a 4-byte length, then at most 256 bytes),
so no client can make the daemon hold more than that, and each read awaits, so no client can
keep the loop from its heartbeats.

    client                                          daemon
    connect
    [u32 length][msgpack {"type": "STATUS", "v": 1}]   ──►   (length <= 256, within 5 s)
                                                    ◄──   [u32 length][msgpack {"type": "STATUS", "v": 1, "status": {...}}]
                                                          or {"type": "ERROR", "v": 1, "error": "..."}; then close
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

from ..deadline import Deadline
from ..protocol.errors import ConfigError, PeerTimeout, ProtocolError, WeightstreamError
from ..security import SocketFile, ipc_path, prepare_ipc_endpoint, refuse_live_ipc_endpoint
from .state import DaemonStatus

__all__ = ["STATUS_VERSION", "StatusServer", "check_status_endpoint", "query_status", "status_dict"]

log = logging.getLogger("weightstream.receiver")

STATUS_VERSION = 1
MAX_REQUEST = 256  # bytes: a request is a two-key map
MAX_REPLY = 1 << 20  # bytes: a status with its last versions is a few KiB
MAX_CLIENTS = 32  # connections served at once; more are closed unanswered
REQUEST_TIMEOUT_S = 5.0  # a client that does not send its request (or read its reply) in time is dropped
_LENGTH = struct.Struct(">I")
_LOG_EVERY_S = 60.0  # refused requests are logged once a minute at most, with how many


def check_status_endpoint(endpoint: object, main_endpoint: str, insecure: bool) -> str:
    """``status_endpoint=``: an ipc path of its own, in a directory only this user can reach."""
    path = ipc_path(endpoint) if isinstance(endpoint, str) else None
    if path is None or not path or not isinstance(endpoint, str):
        raise ConfigError(
            f"status_endpoint={endpoint!r}: expected an ipc:// path (a local socket; the status is not served over "
            f"the network, nor on an abstract socket), e.g. ipc:///tmp/ws-{os.getuid()}/rank0-status.sock"
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
        self.path = ipc_path(endpoint) or ""
        self._describe = describe
        self._server: asyncio.AbstractServer | None = None
        self._file: SocketFile | None = None
        self._clients = 0
        self._refused = 0  # refused requests not logged yet
        self._logged_at = -_LOG_EVERY_S

    async def start(self) -> None:
        refuse_live_ipc_endpoint(self.endpoint, "daemon's status socket", "one daemon per status endpoint")
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST + 16)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            await self.close()
            raise ConfigError(f"status_endpoint={self.endpoint!r}: could not listen there ({exc})") from exc
        self._file = SocketFile.bound_at(self.endpoint)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT_S)
                _check_request(request)
                reply: dict[str, Any] = {"type": "STATUS", "v": STATUS_VERSION, "status": self._describe()}
            except ProtocolError as exc:
                self._refusal(exc)
                reply = {"type": "ERROR", "v": STATUS_VERSION, "error": str(exc)}
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return  # gone, or silent: nothing to answer
            body = msgpack.packb(reply)
            writer.write(_LENGTH.pack(len(body)) + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)  # a client that never reads is dropped
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._clients -= 1
            writer.close()

    def _refusal(self, exc: ProtocolError) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            more = f" ({self._refused - 1} more since the last such line)" if self._refused > 1 else ""
            log.warning("status endpoint %s: refused a request: %s%s", self.endpoint, exc, more)
            self._logged_at, self._refused = now, 0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            self._server = None
        if self._file is not None:
            self._file.remove()
            self._file = None


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_REQUEST:
        raise ProtocolError(f"status request: expected at most {MAX_REQUEST} bytes, got a length of {length}")
    return await reader.readexactly(length)


def _unpack(payload: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:  # not msgpack, truncated, extra bytes, too deep
        raise ProtocolError(f"{what}: not one msgpack value ({type(exc).__name__}: {exc})") from None


def _check_request(payload: bytes) -> None:
    if len(payload) > MAX_REQUEST:
        raise ProtocolError(f"status request: expected at most {MAX_REQUEST} bytes, got {len(payload)}")
    body = _unpack(payload, "status request")
    if not isinstance(body, dict) or body.get("type") != "STATUS":
        raise ProtocolError(f"status request: field 'type': expected 'STATUS', got {str(body)[:60]!r}")
    if body.get("v") != STATUS_VERSION or type(body.get("v")) is not int:
        raise ProtocolError(f"status request: field 'v': expected {STATUS_VERSION}, got {body.get('v')!r}")


def _unanswered(endpoint: str) -> WeightstreamError:
    return WeightstreamError(
        f"{endpoint} closed the connection unanswered: the daemon serves at most {MAX_CLIENTS} clients at once (a "
        f"silent one is dropped after {REQUEST_TIMEOUT_S:.0f}s) or is stopping, or this is not a status socket; try again"
    )


def _recv_exactly(sock: socket.socket, count: int, deadline: Deadline, endpoint: str) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < count:
        left = deadline.left()
        if left <= 0:
            raise PeerTimeout(f"{endpoint} did not finish its answer in time; is the rank's daemon busy or stuck?")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(count - got, 1 << 16))
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            if not chunks and count == _LENGTH.size:
                raise _unanswered(endpoint)
            raise ProtocolError(f"status reply from {endpoint}: the connection closed after {got} of {count} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def query_status(endpoint: str, timeout: float = 5.0, *, insecure: bool = False) -> dict[str, Any]:
    """Ask the daemon serving ``status_endpoint=endpoint`` for its status (a dict: rank, state,
    committed_version, last_error, versions, ...). ``PeerTimeout`` if none answers in ``timeout``."""
    path = ipc_path(endpoint) if isinstance(endpoint, str) else None
    if not path:
        raise ConfigError(f"status endpoint {endpoint!r}: expected the ipc:// path a daemon was given as status_endpoint=")
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):
        raise ConfigError(f"timeout: expected 0 < seconds <= 3600, got {timeout!r}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise WeightstreamError(
            f"no daemon serves {endpoint}: the socket file does not exist; fix: start the rank with "
            f"ReceiverDaemon(..., status_endpoint={endpoint!r})"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise WeightstreamError(f"{endpoint}: {path} is not a socket; fix: the path a daemon was given as status_endpoint=")
    prepare_ipc_endpoint(endpoint, insecure)  # never ask through a directory another user controls
    deadline = Deadline(timeout)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            request = msgpack.packb({"type": "STATUS", "v": STATUS_VERSION})
            sock.sendall(_LENGTH.pack(len(request)) + request)
        except TimeoutError:
            raise PeerTimeout(f"no answer from {endpoint} within {timeout:.1f}s; is the rank's daemon running?") from None
        except (ConnectionResetError, BrokenPipeError):  # it accepted, then closed: full, or not ours
            raise _unanswered(endpoint) from None
        except OSError as exc:
            raise WeightstreamError(
                f"could not reach a daemon at {endpoint} ({exc}); is the rank's daemon running with status_endpoint= "
                "this path?"
            ) from None
        try:
            (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, deadline, endpoint))
        except PeerTimeout:
            raise PeerTimeout(
                f"no answer from {endpoint} within {timeout:.1f}s; is the rank's daemon running (and started with "
                "status_endpoint= this path)? A daemon whose loop is blocked also answers late"
            ) from None
        if length > MAX_REPLY:
            raise ProtocolError(f"status reply from {endpoint}: {length} bytes announced, more than the {MAX_REPLY} allowed")
        reply = _unpack(_recv_exactly(sock, length, deadline, endpoint), f"status reply from {endpoint}")
    if not isinstance(reply, dict) or reply.get("v") != STATUS_VERSION:
        raise ProtocolError(f"status reply from {endpoint}: expected a map with 'v': {STATUS_VERSION}, got {str(reply)[:80]!r}")
    if reply.get("type") == "ERROR":
        raise ProtocolError(f"{endpoint} refused the status request: {reply.get('error')!r}")
    status = reply.get("status")
    if reply.get("type") != "STATUS" or not isinstance(status, dict):
        raise ProtocolError(f"status reply from {endpoint}: expected type 'STATUS' with a 'status' map, got {str(reply)[:80]!r}")
    return status
