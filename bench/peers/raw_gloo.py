"""Raw gloo engine: the cross-host yardstick for weightstream's ``gloo`` transport.

The same bytes through a bare ``torch.distributed.ProcessGroupGloo``: one broadcast per
bucket from the sender (index 0) into each rank's preallocated buffer of one bucket. The
group is built once, before timing, the way :mod:`weightstream.protocol.transports.c10d`
builds one (``TCPStore`` + ``PrefixStore`` + ``ProcessGroupGloo`` options), never through
``init_process_group``. No metadata, no acks, no copy into a model.
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

from .raw_zmq import spans

PREFIX = "bench-raw-gloo"


def dist() -> Any:
    """torch.distributed, imported only by the gloo runs (tcp ranks never load torch)."""
    import torch.distributed

    return torch.distributed


def store_server(timeout: float) -> Any:
    """The sender's TCPStore on a free loopback port (``.port`` says which)."""
    return dist().TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                           wait_for_workers=False)


def make_group(store: Any, index: int, world: int, timeout: float) -> Any:
    """This process's member of the group; returns once every member joined (or raises after ``timeout``)."""
    d = dist()
    options = d.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout)
    options._devices = [d.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return d.ProcessGroupGloo(d.PrefixStore(PREFIX, store), index, world, options)


def join_group(port: int, index: int, world: int, timeout: float) -> Any:
    store = dist().TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=timeout))
    return make_group(store, index, world, timeout)


def as_tensor(buffer: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(buffer)


def send(group: Any, buffer: Any, bucket: int, timeout: float) -> list[Any]:
    """Start one broadcast per bucket of ``buffer`` (a uint8 tensor); the works, to wait on."""
    limit = datetime.timedelta(seconds=timeout)
    return [group.broadcast(buffer[at : at + used], 0, timeout=limit) for at, used in spans(buffer.numel(), bucket)]


def settle(works: list[Any], timeout: float) -> None:
    limit = datetime.timedelta(seconds=timeout)
    for work in works:
        work.wait(limit)


def receive(group: Any, buffer: Any, total: int, bucket: int, timeout: float) -> int:
    """Every bucket of ``total`` bytes into ``buffer[:bucket]``, one broadcast each, in order; the
    last bucket's size."""
    limit, used = datetime.timedelta(seconds=timeout), 0
    for _, used in spans(total, bucket):
        group.broadcast(buffer[:used], 0, timeout=limit).wait(limit)
    return used
