"""Helpers for test_same_host.py: another local user, a small /dev/shm, a hand-played sender.

- ``python_cmd``: this interpreter with the flags pytest runs under (``-P`` matters when a
  test run points ``PYTHONPATH`` at another build of weightstream).
- ``shm_namespace_cmd``: a command that runs this file in a private mount namespace with a
  64 MiB tmpfs on /dev/shm (``unshare -m``); ``shm_scenario`` is what runs there and prints
  one JSON line.
- ``OtherUser``: a spawned child that imports what it needs, drops to an unused uid/gid,
  and then acts as that user (a sender in its own directory, or a shm segment it creates).
- ``HandSender``: a ROUTER that plays the sender by hand, single-threaded (the test calls
  ``wait_for``, which answers PING with PONG). Its slots are real shm segments named for
  the session it announces; it builds on the slot API of both the current and the previous
  build, so a test fails on an old build for what it checks, not for a changed signature.
- ``GatedRank``: a ReceiverDaemon in a spawned process whose plain ``load_weights`` (NumPy
  views) stops after the first view of its first version until the test says go.
- ``umask_zero_dirs``: in a spawned child with umask 0, a sender and a daemon on nested
  ipc paths; returns the mode of every directory they created.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import logging
import multiprocessing as mp
import os
import pwd
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fault_workers import wait_until as wait_until  # the tests import it from here too
from hand_router import HandRouter

HERE = Path(__file__).resolve()
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
MiB = 1 << 20
SPAWN = mp.get_context("spawn")


def python_cmd() -> list[str]:
    """This interpreter, with -P when pytest runs under -P (else cwd could shadow PYTHONPATH)."""
    return [sys.executable, *(["-P"] if sys.flags.safe_path else [])]


# --- slots that work with the current and the previous slot API ------------------------------


def make_slots(count: int, size: int, session: str) -> list[Any]:
    """Real shm slots named ``ws_<pid>_<session>_...`` (the previous build names them without a
    session and has no ``session`` argument: its ranks do not look at the name)."""
    from weightstream.protocol.transports.shm import TRANSPORT

    try:
        return TRANSPORT.create_slots(count, size, session=session)  # type: ignore[call-arg]
    except TypeError:
        return TRANSPORT.create_slots(count, size)


def descriptor(name: str, size: int) -> dict[str, Any]:
    from weightstream.protocol.transports.shm import host_identity

    return {"name": name, "size": size, "host": host_identity()}


# --- a small /dev/shm in a private mount namespace -------------------------------------------


SHM_SIZE = 64 * MiB


def shm_namespace_cmd(*args: str, size: int = SHM_SIZE) -> list[str]:
    """Run ``same_host_workers.py shm ARGS`` with a private tmpfs of ``size`` on /dev/shm."""
    mount = f"mount -t tmpfs -o size={size // 1024}k tmpfs /dev/shm && exec \"$@\""
    return ["unshare", "-m", "sh", "-c", mount, "sh", *python_cmd(), str(HERE), "shm", *args]


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _shm_stats() -> dict[str, int]:
    st = os.statvfs("/dev/shm")
    return {"shm_total": st.f_blocks * st.f_frsize, "shm_free": st.f_bavail * st.f_frsize}


def big_layout() -> list[tuple[str, str, tuple[int, ...]]]:
    """fault_workers.LAYOUT and a 6 MiB tensor: chunked over 4 MiB slots, every page of both written."""
    from fault_workers import LAYOUT

    return [*LAYOUT, ("huge.w", "float32", (1536, 1024))]


def shm_scenario(scenario: str, endpoint: str) -> None:
    """One line of JSON: what the sender's constructor did, and for ``fits`` a push's digests."""
    from weightstream import BucketSender, TransportError

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    out: dict[str, Any] = {"scenario": scenario, **_shm_stats()}
    opts: dict[str, Any] = {}
    if scenario == "crowded":  # something else holds 40 MiB of the 64: 2 x 16 MiB slots fit one by one only
        with open("/dev/shm/filler", "wb") as f:
            f.write(b"\x5a" * (40 * MiB))
        out["after_filler"] = _shm_stats()["shm_free"]
        opts = {"bucket_bytes": 16 * MiB, "num_buffers": 2}
    elif scenario == "fits":
        opts = {"bucket_bytes": 4 * MiB, "num_buffers": 2, "timeout": 30.0, **HB}
    try:
        sender = BucketSender(endpoint, **opts)
    except TransportError as exc:
        _say({**out, "raised": "TransportError", "message": str(exc)})
        return
    out["raised"] = None
    if scenario != "fits":  # the constructor should have refused; say what it made
        out["segments"] = sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("ws_"))
        sender.close()
        _say(out)
        return
    from fault_workers import digests, make_weights
    from hostile_workers import DaemonProc

    rank = DaemonProc(endpoint, 0)  # a rank in its own process, in this namespace
    try:
        sender.wait_for_receivers(1, timeout=20)
        weights = make_weights(7, "v1", big_layout())
        report = sender.push(weights, "v1")
        status = rank.wait_status(lambda s: s["committed_version"] == "v1", 10)
        status = rank.status(digests=True)
        out.update(
            pushed_bytes=report.bytes,
            buckets=report.buckets,
            committed=status["committed_version"],
            model_intact=status["model_intact"],
            rank_digests=status["digests"],
            expected_digests=digests(weights),
            segments=sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("ws_")),
            **_shm_stats(),
        )
    finally:
        rank.stop()
        sender.close()
    _say(out)


# --- another local user ----------------------------------------------------------------------


def unused_ids() -> tuple[int, int]:
    """A uid and gid that no account or group on this host has."""
    for uid in range(54321, 54421):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid, uid
    raise RuntimeError("no unused uid in 54321..54420")


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _other_user_main(conn: Any, uid: int, gid: int, task: str, args: dict[str, Any]) -> None:
    try:
        # everything this child will need, imported while it can still read root's files
        from fault_workers import BUCKET_BYTES, make_weights

        from weightstream import (
            BucketSender,
            security,  # noqa: F401
        )
        from weightstream.protocol import messages  # noqa: F401
        from weightstream.protocol.transports import shm  # noqa: F401

        make_weights(0, "warm-up")  # imports ml_dtypes (bfloat16)
        import tempfile

        _become(uid, gid)
        if task == "segment":
            path = f"/dev/shm/{args['name']}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, args["size"])
            finally:
                os.close(fd)
            st = os.stat(path)
            conn.send({"ok": True, "uid": st.st_uid, "mode": stat.S_IMODE(st.st_mode)})
            return
        if task != "sender":
            raise ValueError(task)
        base = tempfile.mkdtemp(prefix="ws-other-", dir="/tmp")
        endpoint = f"ipc://{base}/x.sock"
        sender = BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB)
    except BaseException as exc:
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    st = os.stat(base)
    conn.send({"ok": True, "endpoint": endpoint, "dir": base, "dir_uid": st.st_uid,
               "dir_mode": stat.S_IMODE(st.st_mode), "euid": os.geteuid()})
    try:
        while True:
            cmd = conn.recv()
            try:
                if cmd["cmd"] == "push":
                    sender.wait_for_receivers(1, timeout=cmd.get("timeout", 20.0))
                    report = sender.push(make_weights(cmd["seed"], cmd["version"]), cmd["version"])
                    conn.send({"ok": True, "ranks": sorted(report.receivers)})
                elif cmd["cmd"] == "close":
                    sender.close()
                    conn.send({"ok": True})
                    return
            except Exception as exc:
                conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        sender.close()


class OtherUser:
    """A spawned child running as another uid (``task``: "sender" or "segment")."""

    def __init__(self, uid: int, gid: int, task: str, **args: Any) -> None:
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_other_user_main, args=(child, uid, gid, task, args), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(60.0):
            self.kill()
            raise TimeoutError(f"the other user's {task} did not start")
        self.started: dict[str, Any] = self._conn.recv()
        if not self.started.get("ok"):
            self.kill()
            raise RuntimeError(f"the other user's {task} failed: {self.started}")

    def request(self, timeout: float = 60.0, **cmd: Any) -> dict[str, Any]:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the other user's process gave no reply to {cmd} within {timeout}s")
        return self._conn.recv()  # type: ignore[no-any-return]

    def finish(self) -> None:
        if self.proc.is_alive():
            try:
                self.request(timeout=20.0, cmd="close")
            except Exception:
                pass
            self.proc.join(20)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self._conn.close()


# --- a sender played by hand -------------------------------------------------------------


class HandSender(HandRouter):
    """A bare ROUTER at ``endpoint`` (its directory made 0700 by hand). The test builds every
    WELCOME, BEGIN and BUCKET; ``slots`` made here are closed (unlinked) by ``close``."""

    def __init__(self, endpoint: str) -> None:
        directory = os.path.dirname(endpoint[len("ipc://"):])
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        super().__init__(endpoint)
        self.owned: list[Any] = []  # slots to close
        self.extra: list[str] = []  # /dev/shm names to unlink

    def slots(self, count: int, size: int, session: str) -> list[Any]:
        made = make_slots(count, size, session)
        self.owned += made
        return made

    def wait_for(self, kinds: type | tuple[type, ...], timeout: float = 10.0) -> Any:
        """The next message of one of ``kinds``, or None after ``timeout``."""
        return self.poll_for(kinds, timeout)

    def welcome(self, session: str, slots: list[dict[str, Any]], bucket_bytes: int) -> Any:
        from weightstream.protocol import messages as m

        return m.Welcome(session=session, transport="shm", bucket_bytes=bucket_bytes, alignment=m.ALIGNMENT,
                         slots=slots, heartbeat_interval=0.2, heartbeat_timeout=30.0, pid=os.getpid())

    @staticmethod
    def begin(version: str, named: list[tuple[str, np.ndarray]]) -> Any:
        from weightstream.protocol import messages as m
        from weightstream.protocol.dtypes import from_numpy

        return m.Begin.build(version=version, names=[n for n, _ in named],
                             dtypes=[from_numpy(a.dtype).code for _, a in named],
                             shapes=[list(a.shape) for _, a in named],
                             total_bytes=sum(a.nbytes for _, a in named), buckets=1)

    @staticmethod
    def bucket(version: str, named: list[tuple[str, np.ndarray]], slot: Any, index: int) -> tuple[Any, list[int]]:
        """Write ``named`` into ``slot`` (aligned) and return BUCKET seq 0 with its checksum, and the offsets."""
        from weightstream.protocol import messages as m

        view = slot.host_view()
        offsets, nbytes, off = [], [], 0
        for _, a in named:
            raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            view[off:off + raw.nbytes] = raw
            offsets.append(off)
            nbytes.append(raw.nbytes)
            off += -(-raw.nbytes // m.ALIGNMENT) * m.ALIGNMENT
        used = offsets[-1] + nbytes[-1]
        msg = m.Bucket.build(version=version, seq=0, slot=index, first=0, offsets=offsets, nbytes=nbytes,
                             chunks=[0] * len(named), checksum=slot.digest(used))
        return msg, offsets

    def close(self) -> None:
        self.close_socket()
        for slot in self.owned:
            slot.close()
        for name in self.extra:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass


# --- a rank whose load_weights waits after its first view --------------------------------------


def _gated_main(conn: Any, endpoint: str, first_seen: Any, go: Any) -> None:
    from fault_workers import digests

    from weightstream import ReceiverDaemon

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    state: dict[str, np.ndarray] = {}
    calls = [0]

    def load_weights(weights: Any) -> None:
        calls[0] += 1
        for i, (name, view) in enumerate(weights):
            if calls[0] == 1 and i == 0:  # first view of the first version: hold it until the test says go
                first_seen.set()
                go.wait(20)
            state[name] = np.array(view, copy=True)

    daemon = ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, heartbeat_interval=0.1,
                            heartbeat_timeout=30.0)
    daemon.start()
    conn.send({"started": True})
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            daemon.stop()
            return
        if cmd["cmd"] == "status":
            out = dataclasses.asdict(daemon.status)
            out["digests"] = digests(state)
            conn.send(out)
        elif cmd["cmd"] == "stop":
            daemon.stop()
            conn.send({"ok": True})
            return


class GatedRank:
    def __init__(self, endpoint: str) -> None:
        self.first_seen = SPAWN.Event()
        self.go = SPAWN.Event()
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_gated_main, args=(child, endpoint, self.first_seen, self.go), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(60.0):
            self.stop()
            raise TimeoutError("gated rank did not start")
        self._conn.recv()

    def status(self) -> dict[str, Any]:
        self._conn.send({"cmd": "status"})
        if not self._conn.poll(30.0):
            raise TimeoutError("gated rank gave no status")
        return self._conn.recv()  # type: ignore[no-any-return]

    def wait_status(self, predicate: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if predicate(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def stop(self) -> None:
        self.go.set()
        if self.proc.is_alive():
            try:
                self._conn.send({"cmd": "stop"})
                self._conn.poll(20.0)
            except (OSError, EOFError):
                pass
            self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self._conn.close()


# --- umask 0 -------------------------------------------------------------------------------------


def _umask_main(conn: Any, base: str) -> None:
    try:
        from fault_workers import BUCKET_BYTES, Collector

        from weightstream import BucketSender, ReceiverDaemon

        os.umask(0)
        BucketSender(f"ipc://{base}/s1/s2/s3/x.sock", bucket_bytes=BUCKET_BYTES).close()
        made = []
        try:
            ReceiverDaemon(f"ipc://{base}/r1/r2/x.sock", Collector())
        except Exception as exc:  # reported: the test asserts on the directories
            made.append(f"ReceiverDaemon raised {type(exc).__name__}: {exc}")
        modes = {}
        for rel in ("s1", "s1/s2", "s1/s2/s3", "r1", "r1/r2"):
            p = os.path.join(base, rel)
            modes[rel] = stat.S_IMODE(os.stat(p).st_mode) if os.path.isdir(p) else None
        conn.send({"ok": True, "modes": modes, "notes": made})
    except BaseException as exc:
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def umask_zero_dirs(base: str) -> dict[str, Any]:
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_umask_main, args=(child, base), daemon=True)
    proc.start()
    child.close()
    try:
        if not conn.poll(60.0):
            raise TimeoutError("umask child gave no reply")
        return conn.recv()  # type: ignore[no-any-return]
    finally:
        proc.join(20)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        conn.close()


def random_segment_name(session: str) -> str:
    """A segment name of the calling process's sender session, as a rank expects it."""
    return f"ws_{os.getpid()}_{session}_{secrets.token_hex(4)}"


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # under -P the script's directory is not on sys.path
    if sys.argv[1] == "shm":
        shm_scenario(sys.argv[2], sys.argv[3])
