"""Messages are plain frozen dataclasses, and what a codec remembers between frames belongs to
one session: two codecs in one process never answer from each other's memory, and memory never
changes what a frame decodes to."""

from __future__ import annotations

import dataclasses
import inspect

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightstream import BucketSender, ReceiverDaemon
from weightstream.protocol import messages as m
from weightstream.protocol.errors import ProtocolError
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(60)


def _begin(prefix: str, count: int, width: int, version: str = "v1") -> m.Begin:
    names = [f"{prefix}.{i}" for i in range(count)]
    return m.Begin.build(version, names, [8] * count, [[width]] * count, 4 * width * count, 1)


# --- the classes ------------------------------------------------------------------------------


def test_every_message_is_a_registered_frozen_slotted_dataclass() -> None:
    # slots=True remakes each class: the module's names are the real ones
    assert {cls for cls in m.Message.__subclasses__() if getattr(m, cls.__name__) is cls} == set(m.MESSAGES)
    assert len({cls.TYPE for cls in m.MESSAGES}) == len(m.MESSAGES)
    for cls in m.MESSAGES:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
        names = [f.name for f in dataclasses.fields(cls)]
        # the generated __init__ takes the fields in wire order: what a type checker sees
        assert list(inspect.signature(cls).parameters) == names, cls
        assert [name for name, _, _ in m._FIELDS[cls.TYPE]] == names, cls
        assert all("spec" in f.metadata for f in dataclasses.fields(cls)), cls
        assert "__dict__" not in dir(cls) and set(cls.__slots__) == set(names), cls  # type: ignore[attr-defined]


def test_a_message_cannot_be_changed_or_given_more_attributes() -> None:
    ack = m.Ack(version="v1", seq=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ack.seq = 4  # type: ignore[misc]
    assert not hasattr(ack, "__dict__")  # slotted all the way up: no room for anything else
    with pytest.raises(TypeError):
        m.Ack(version="v1")  # type: ignore[call-arg]  # a required field is required in Python too


# --- per-session memory ---------------------------------------------------------------------------


def test_two_codecs_in_one_process_do_not_share_what_they_remember() -> None:
    frame_a, frame_b = m.encode(_begin("a", 50, 3)), m.encode(_begin("b", 70, 5))
    rank_a, rank_b = m.Codec(), m.Codec()
    first_a = rank_a.decode(frame_a)
    first_b = rank_b.decode(frame_b)
    # with one shared memory, b's manifest would have evicted a's
    again_a, again_b = rank_a.decode(frame_a), rank_b.decode(frame_b)
    assert again_a.names is first_a.names and again_b.names is first_b.names  # type: ignore[attr-defined]
    assert first_a.names is not first_b.names  # type: ignore[attr-defined]
    assert rank_a.manifest_arrays(again_a).sizes.tolist() == [12] * 50  # type: ignore[arg-type]
    assert rank_b.manifest_arrays(again_b).sizes.tolist() == [20] * 70  # type: ignore[arg-type]
    # a sender's memory is its own too: what one sends never answers another's encode
    send_a, send_b = m.Codec(), m.Codec()
    assert send_a.encode(_begin("a", 50, 3)) == frame_a and send_b.encode(_begin("b", 70, 5)) == frame_b
    assert send_a.encode(_begin("a", 50, 3)) == frame_a


def test_the_module_codec_remembers_nothing() -> None:
    frame = m.encode(_begin("a", 20, 3))
    first, again = m.decode(frame), m.decode(frame)
    assert first == again and first.names is not again.names  # type: ignore[attr-defined]
    assert not [name for name, value in vars(m).items() if name.startswith("_last")]


def test_a_sender_and_a_daemon_in_one_process_keep_their_own_manifests(endpoint_dir: object) -> None:
    """Two sessions in one process, each with its own manifest, pushed in turns: each side's codec
    holds its own session's names, and every version arrives bit-exact."""
    ends = [f"ipc://{endpoint_dir}/sock/{k}.sock" for k in "ab"]
    models = {
        "a": {f"a.{i}": np.full(3, i, np.float32) for i in range(40)},
        "b": {f"b.{i}": np.full((2, 5), i, np.int64) for i in range(60)},
    }
    states = {k: {n: np.zeros_like(t) for n, t in model.items()} for k, model in models.items()}
    hb = {"heartbeat_interval": 0.1}
    with BucketSender(ends[0], bucket_bytes=1 << 16, timeout=20, **hb) as send_a, \
            BucketSender(ends[1], bucket_bytes=1 << 16, timeout=20, **hb) as send_b, \
            ReceiverDaemon(ends[0], NumpySink(states["a"]), rank=0, **hb) as rank_a, \
            ReceiverDaemon(ends[1], NumpySink(states["b"]), rank=0, **hb) as rank_b:
        for step in range(2):
            for key, sender in (("a", send_a), ("b", send_b)):
                pushed = {n: t + step for n, t in models[key].items()}
                sender.push(list(pushed.items()), version=f"step_{step}")
                assert all(np.array_equal(states[key][n], t) for n, t in pushed.items()), key
        assert rank_a.committed_version == rank_b.committed_version == "step_1"
        codecs = [send_a._publisher._codec, send_b._publisher._codec, rank_a._session.codec, rank_b._session.codec]
        assert len({id(c) for c in codecs}) == 4
        assert codecs[0]._joined is not None and codecs[0]._joined[0] == list(models["a"])
        assert codecs[1]._joined is not None and codecs[1]._joined[0] == list(models["b"])
        assert codecs[2]._names is not None and codecs[2]._names[1] == list(models["a"])
        assert codecs[3]._names is not None and codecs[3]._names[1] == list(models["b"])


# --- memory never changes an outcome ----------------------------------------------------------------

_GOOD = [_begin("a", 5, 3), _begin("a", 5, 3, "v2"), _begin("b", 3, 2), _begin("a", 4, 3)]


def _mutated(begin: m.Begin, how: int) -> bytes:
    body = msgpack.unpackb(m.encode(begin), raw=False)
    if how == 1:
        body["total_bytes"] += 4
    elif how == 2:
        body["names"] = body["names"].replace(b".1", b".0")  # a duplicate name
    elif how == 3:
        body["dtypes"] = body["dtypes"][:-1] + bytes([99])
    elif how == 4:
        body["dims"] = body["dims"][:-8] + (7).to_bytes(8, "little")  # same names, another shape
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _outcome(decode: object, frame: bytes) -> object:
    try:
        return decode(frame)  # type: ignore[operator]
    except ProtocolError as exc:
        return ("ProtocolError", str(exc))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 4)), min_size=1, max_size=12))
def test_a_codec_decodes_every_sequence_as_the_stateless_decode_does(steps: list[tuple[int, int]]) -> None:
    codec = m.Codec()
    for index, how in steps:
        frame = _mutated(_GOOD[index], how)
        assert _outcome(codec.decode, frame) == _outcome(m.decode, frame)
