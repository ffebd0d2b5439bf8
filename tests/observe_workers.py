"""A rank process for the observability tests: a ReceiverDaemon with a status endpoint, metrics
served over HTTP and its log records kept, driven over a pipe (plain data only)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from dataclasses import asdict
from typing import Any

import numpy as np

from weightstream import ReceiverDaemon, WeightstreamError

SPECS = {f"w{i}": ("float32", (256, 64)) for i in range(8)}  # 64 KiB each, 512 KiB in all


def weights(step: int) -> list[tuple[str, np.ndarray]]:
    return [(name, np.full(shape, step * 100 + i, dtype=dtype)) for i, (name, (dtype, shape)) in enumerate(SPECS.items())]


class Records(logging.Handler):
    """The daemon's version lines, as (message, the record's ``weightstream`` fields)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "weightstream", None)
        if fields is not None:
            self.lines.append((record.getMessage(), dict(fields)))


class SlowLoad:
    """load_weights that sleeps ``pause`` seconds after its first tensor: the served model is
    being changed for at least that long. ``fail_step`` raises in that step's version."""

    def __init__(self, pause: float, fail_step: int | None) -> None:
        self.model: dict[str, np.ndarray] = {}
        self.pause = pause
        self.fail_step = fail_step

    def __call__(self, named: Any) -> None:
        for i, (name, tensor) in enumerate(named):
            arr = np.array(tensor, copy=True)
            if self.fail_step is not None and int(arr.flat[0]) // 100 == self.fail_step:
                raise ValueError(f"this rank refuses step {self.fail_step}")
            self.model[name] = arr
            if i == 0 and self.pause:
                time.sleep(self.pause)


def rank_main(conn: Any, endpoint: str, rank: int, opts: dict[str, Any]) -> None:
    try:
        records = Records()
        logging.getLogger("weightstream").addHandler(records)
        logging.getLogger("weightstream").setLevel(logging.INFO)
        server = None
        metrics: Any = None
        if opts.get("metrics"):
            from weightstream.metrics import serve_metrics

            metrics = True
            server = serve_metrics(0)
        load = SlowLoad(opts.get("pause", 0.0), opts.get("fail_step"))
        daemon = ReceiverDaemon(
            endpoint, load, rank=rank, expected=SPECS, staged=opts.get("staged", False), heartbeat_interval=0.2,
            status_endpoint=opts.get("status_endpoint"), metrics=metrics,
        )
        daemon.start()
        conn.send({"event": "started", "port": server.server_port if server is not None else None})
        while True:
            if not conn.poll(60):
                break
            cmd = conn.recv()
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "wait":
                try:
                    daemon.wait_for_version(cmd["version"], timeout=cmd.get("timeout", 30))
                    ok, error = True, None
                except WeightstreamError as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                conn.send({"ok": ok, "error": error, "status": asdict(daemon.status), "lines": records.lines})
        daemon.stop()
        if server is not None:
            server.shutdown()
        conn.send({"event": "stopped"})
    except BaseException as exc:  # report, never hang the test
        conn.send({"event": "crashed", "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


class RankProc:
    def __init__(self, endpoint: str, rank: int, **opts: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=rank_main, args=(child, endpoint, rank, opts), daemon=True)
        self.proc.start()
        hello = self.recv(60)
        if hello.get("event") != "started":
            raise RuntimeError(f"rank {rank} did not start: {hello}")
        self.port: int | None = hello["port"]

    def recv(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"rank process said nothing within {timeout}s")
        got: dict[str, Any] = self.conn.recv()
        if got.get("event") == "crashed":
            raise RuntimeError(f"rank process crashed: {got['error']}\n{got['tb']}")
        return got

    def wait(self, version: str, timeout: float = 30.0) -> dict[str, Any]:
        self.conn.send({"cmd": "wait", "version": version, "timeout": timeout})
        return self.recv(timeout + 30)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"cmd": "stop"})
                self.recv(30)
            except (OSError, TimeoutError, RuntimeError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
