"""Sinks copy each view into the model (in place where the model has storage) and route by prefix."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from weightstream.frameworks import dtype_of, host_bytes, view_as
from weightstream.protocol.dtypes import by_name
from weightstream.protocol.errors import ManifestMismatch, WeightstreamError
from weightstream.receiver.sinks import NumpySink, PrefixRouter, as_sink

pytestmark = pytest.mark.timeout(60)


def stream(framework: str, named: dict[str, np.ndarray]) -> Iterator[tuple[str, Any]]:
    """What the daemon does: one shared bucket, each view valid until the iterator advances.

    After the consumer moves on, the bucket bytes are scribbled over, so a sink that kept
    a view (instead of copying) ends up with garbage and the test sees it.
    """
    bucket = np.zeros(max([a.nbytes for a in named.values()] + [1]), dtype=np.uint8)
    for name, arr in named.items():
        buf = bucket[: arr.nbytes]
        buf[:] = host_bytes(arr)
        yield name, view_as(framework, buf, dtype_of(arr), arr.shape)  # type: ignore[arg-type]
        bucket[:] = 0xA5  # the slot is reused by the next bucket


def raw(t: Any) -> bytes:
    return host_bytes(t).tobytes()


def test_importing_sinks_does_not_import_frameworks() -> None:
    code = "import sys, weightstream.receiver.sinks; print('torch' in sys.modules, 'paddle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- NumPy -----------------------------------------------------------------------------


def test_numpy_sink_specs_follow_every_change_to_its_state() -> None:
    """The specs object is reused while the dict is untouched (the daemon then skips the manifest
    check), and rebuilt after anything was added, removed or rebound, even back to what it was."""
    state = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.int64)}
    sink = NumpySink(state)
    specs = sink.param_specs()
    assert sink.param_specs() is specs and sink.param_specs() is specs
    original = state["w"]
    state["w"] = np.zeros((3, 2), np.float32)  # same name, another shape
    changed = sink.param_specs()
    assert changed["w"] == ("float32", (3, 2)) and sink.param_specs() is changed
    state["w"] = original  # back: equal to the first specs again
    assert sink.param_specs() == specs
    state["extra"] = np.zeros(1, np.int8)
    assert "extra" in sink.param_specs()
    del state["extra"], state["b"]
    assert sink.param_specs() == {"w": ("float32", (2, 3))}


def test_numpy_sink_in_place() -> None:
    state = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, by_name("bfloat16").numpy)}
    ids = {k: id(v) for k, v in state.items()}
    sink = NumpySink(state)
    assert sink.param_specs() == {"w": ("float32", (2, 3)), "b": ("bfloat16", (3,))}
    new = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, by_name("bfloat16").numpy)}
    sink.load_weights(stream("numpy", new))
    assert {k: id(v) for k, v in state.items()} == ids  # same arrays, overwritten
    assert raw(state["w"]) == raw(new["w"]) and raw(state["b"]) == raw(new["b"])
    dest = sink.destination("w")
    assert dest is not None and np.shares_memory(dest, state["w"]) and dest.flags.writeable
    assert sink.destination("nope") is None


def test_numpy_sink_errors() -> None:
    sink = NumpySink({"w": np.zeros(3, np.float32)})
    with pytest.raises(ManifestMismatch, match=r"'x'.*close names: w|'x'"):
        sink.load_weights(stream("numpy", {"x": np.zeros(3, np.float32)}))
    with pytest.raises(ManifestMismatch, match=r"expected float32\[3\], got float16\[3\]"):
        sink.load_weights(stream("numpy", {"w": np.zeros(3, np.float16)}))
    with pytest.raises(ManifestMismatch, match=r"expected float32\[3\], got float32\[4\]"):
        sink.load_weights(stream("numpy", {"w": np.zeros(4, np.float32)}))


def test_numpy_sink_collects_copies() -> None:
    target: dict[str, np.ndarray] = {}
    sink = as_sink(target)
    assert isinstance(sink, NumpySink) and sink.param_specs() == {}
    new = {"a": np.arange(4, dtype=np.int64), "s": np.array(2.5, np.float64), "e": np.zeros((0, 2), np.int8)}
    sink.load_weights(stream("numpy", new))
    assert target is sink.state and set(target) == {"a", "s", "e"}
    for k, v in new.items():
        assert raw(target[k]) == raw(v) and target[k].shape == v.shape  # survived the scribble: a copy
    kept = target["a"]
    sink.load_weights(stream("numpy", {"a": np.arange(4, 8, dtype=np.int64)}))
    assert target["a"] is kept and target["a"].tolist() == [4, 5, 6, 7]  # reused in place
    assert sink.destination("a") is None  # a collector does not know shapes ahead of time


# --- torch -----------------------------------------------------------------------------


def torch_model() -> Any:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model.to(torch.float32)
    return model


def test_torch_sink_in_place_and_no_alias() -> None:
    torch = pytest.importorskip("torch")
    model = torch_model()
    sink = as_sink(model)
    assert sink.framework == "torch"
    specs = sink.param_specs()
    assert specs["0.weight"] == ("float32", (2, 3)) and specs["1.num_batches_tracked"] == ("int64", ())
    assert specs["1.running_mean"] == ("float32", (2,))
    before = {k: (id(t), t.data_ptr()) for k, t in model.state_dict(keep_vars=True).items()}
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(s).astype(np.float32) for k, (_, s) in specs.items() if k != "1.num_batches_tracked"}
    new["1.num_batches_tracked"] = np.array(7, np.int64)
    sink.load_weights(stream("torch", new))
    after = model.state_dict(keep_vars=True)
    for k, v in new.items():
        assert (id(after[k]), after[k].data_ptr()) == before[k]  # same tensor, same storage
        assert raw(after[k]) == raw(v)  # and the bytes survived the bucket scribble
    assert model[0].weight.requires_grad and isinstance(model[0].weight, torch.nn.Parameter)
    dest = sink.destination("0.weight")
    assert dest is not None and dest.ctypes.data == model[0].weight.data_ptr() and dest.nbytes == 24


def test_torch_sink_skips_extra_state_and_sees_a_moved_tensor() -> None:
    """A module's get_extra_state payload is not a tensor to load; a reassigned .data is a new spec."""
    torch = pytest.importorskip("torch")

    class WithExtra(torch.nn.Linear):
        def get_extra_state(self) -> dict[str, int]:
            return {"step": 3}

        def set_extra_state(self, state: Any) -> None:
            pass

    model = WithExtra(3, 2)
    assert "_extra_state" in model.state_dict()
    sink = as_sink(model)
    specs = sink.param_specs()
    assert sorted(specs) == ["bias", "weight"]
    assert sink.param_specs() is specs  # nothing moved: the same object, the check is skipped
    model.bias.data = torch.zeros(2)  # same name, dtype and shape, new memory
    moved = sink.param_specs()
    assert moved is not specs and moved == specs
    value = np.arange(2, dtype=np.float32)
    sink.load_weights(stream("torch", {"bias": value}))
    assert raw(model.bias) == raw(value)


def test_torch_sink_materialises_meta() -> None:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[0].weight.weight_loader = "custom"  # an engine's attribute must survive
    model[0].weight.requires_grad_(False)
    sink = as_sink(model)
    specs = sink.param_specs()
    assert specs["0.weight"] == ("float32", (2, 3))  # known without storage
    assert sink.destination("0.weight") is None
    new = {k: np.full(s, i, np.float32) for i, (k, (_, s)) in enumerate(specs.items()) if k != "1.num_batches_tracked"}
    new["1.num_batches_tracked"] = np.array(3, np.int64)
    sink.load_weights(stream("torch", new))
    state = model.state_dict(keep_vars=True)
    for k, v in new.items():
        assert not state[k].is_meta and raw(state[k]) == raw(v)
    w = model[0].weight
    assert isinstance(w, torch.nn.Parameter) and not w.requires_grad and w.weight_loader == "custom"
    assert model[0].bias.requires_grad
    assert not isinstance(model[1].running_mean, torch.nn.Parameter)
    out = model.eval()(torch.ones(1, 3))  # the model runs on the received weights
    assert out.shape == (1, 2)


def test_torch_sink_meta_tied_weights() -> None:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(4, 2), "head": torch.nn.Linear(2, 4, bias=False)})
    model["head"].weight = model["emb"].weight  # tied: one tensor, two names
    sink = as_sink(model)
    sink.load_weights(stream("torch", {"emb.weight": np.arange(8, dtype=np.float32).reshape(4, 2)}))
    assert model["head"].weight is model["emb"].weight and not model["head"].weight.is_meta


def test_torch_sink_errors() -> None:
    pytest.importorskip("torch")
    sink = as_sink(torch_model())
    with pytest.raises(ManifestMismatch, match=r"0.wieght.*close names: 0.weight"):
        sink.load_one("0.wieght", None)
    with pytest.raises(ManifestMismatch, match=r"expected float32\[2, 3\], got float16\[2, 3\]"):
        sink.load_weights(stream("torch", {"0.weight": np.zeros((2, 3), np.float16)}))
    with pytest.raises(WeightstreamError, match=r"torch.nn.Module"):
        type(sink)(object())


# --- paddle ----------------------------------------------------------------------------


def paddle_model(lazy: bool = False) -> Any:
    paddle = pytest.importorskip("paddle")

    class Net(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.layers = paddle.nn.LayerList([paddle.nn.Linear(3, 2), paddle.nn.BatchNorm1D(2)])
            self.register_buffer("scratch", paddle.zeros([2]), persistable=False)

        def forward(self, x: Any) -> Any:
            return self.layers[1](self.layers[0](x))

    if lazy:
        with paddle.LazyGuard():
            return Net()
    return Net()


def test_paddle_sink_in_place_and_no_alias() -> None:
    layer = paddle_model()
    sink = as_sink(layer)
    assert sink.framework == "paddle"
    specs = sink.param_specs()
    assert "scratch" not in specs  # not persistable: not part of the state dict
    assert specs["layers.0.weight"] == ("float32", (3, 2)) and specs["layers.1._mean"] == ("float32", (2,))
    before = {k: (id(t), t.data_ptr()) for k, t in layer.state_dict().items()}
    new = {k: np.full(s, i + 0.5, np.float32) for i, (k, (_, s)) in enumerate(specs.items())}
    sink.load_weights(stream("paddle", new))
    after = layer.state_dict()
    for k, v in new.items():
        assert (id(after[k]), after[k].data_ptr()) == before[k]  # same tensor, same storage
        assert raw(after[k]) == raw(v)  # the data changed, and survived the bucket scribble
    assert not layer.layers[0].weight.stop_gradient  # still trainable
    dest = sink.destination("layers.0.weight")
    assert dest is not None and dest.ctypes.data == layer.layers[0].weight.data_ptr() and dest.nbytes == 24
    dest[:] = np.ones(6, np.float32).view(np.uint8)  # the daemon's in-place chunk write
    assert layer.layers[0].weight.numpy().tolist() == [[1.0, 1.0]] * 3


def test_paddle_sink_all_dtypes_in_place() -> None:
    paddle = pytest.importorskip("paddle")
    layer = paddle.nn.Layer()
    names = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
             "float8_e4m3fn", "float8_e5m2"]  # fmt: skip
    for n in names:
        layer.register_buffer("b_" + n, paddle.zeros([2, 3], dtype=n))  # Layer has .float16() etc.
    rng = np.random.default_rng(1)
    new = {}
    for n in names:
        d = by_name(n)
        raw_bytes = rng.integers(0, 2 if n == "bool" else 256, size=6 * d.itemsize, dtype=np.uint8)
        new["b_" + n] = raw_bytes.view(d.numpy).reshape(2, 3)
    as_sink(layer).load_weights(stream("paddle", new))
    for n in names:
        assert raw(getattr(layer, "b_" + n)) == raw(new["b_" + n]), n


def test_paddle_sink_materialises_lazy() -> None:
    paddle = pytest.importorskip("paddle")
    layer = paddle_model(lazy=True)
    w = layer.layers[0].weight
    assert not w._is_initialized()
    sink = as_sink(layer)
    specs = sink.param_specs()
    assert specs["layers.0.weight"] == ("float32", (3, 2))
    assert sink.destination("layers.0.weight") is None
    new = {k: np.full(s, i + 1, np.float32) for i, (k, (_, s)) in enumerate(specs.items())}
    sink.load_weights(stream("paddle", new))
    assert layer.layers[0].weight is w and w._is_initialized() and not w.stop_gradient
    for k, t in layer.state_dict().items():
        assert raw(t) == raw(new[k]), k  # copied, not aliasing the (scribbled) bucket
    layer.eval()
    assert layer(paddle.ones([1, 3])).shape == [1, 2]


def test_paddle_sink_errors() -> None:
    pytest.importorskip("paddle")
    sink = as_sink(paddle_model())
    with pytest.raises(ManifestMismatch, match=r"close names: layers.0.weight"):
        sink.load_weights(stream("paddle", {"layers.0.wieght": np.zeros((3, 2), np.float32)}))
    with pytest.raises(ManifestMismatch, match=r"expected float32\[3, 2\], got float32\[2, 3\]"):
        sink.load_weights(stream("paddle", {"layers.0.weight": np.zeros((2, 3), np.float32)}))
    with pytest.raises(ManifestMismatch):
        sink.load_weights(stream("paddle", {"scratch": np.zeros(2, np.float32)}))  # not persistable


# --- router ----------------------------------------------------------------------------


def test_router_strips_prefix_and_streams() -> None:
    main = NumpySink({"w": np.zeros(2, np.float32), "mtp_like": np.zeros(1, np.int8)})
    mtp = NumpySink({"w": np.zeros(3, np.float32)})
    head = NumpySink({"w": np.zeros(1, np.float32)})
    router = PrefixRouter({"mtp.": mtp, "mtp.head.": head}, default=main)
    assert router.framework == "numpy"
    assert router.param_specs() == {
        "w": ("float32", (2,)),
        "mtp_like": ("int8", (1,)),
        "mtp.w": ("float32", (3,)),
        "mtp.head.w": ("float32", (1,)),
    }
    new = {
        "mtp.w": np.array([1, 2, 3], np.float32),
        "w": np.array([4, 5], np.float32),
        "mtp.head.w": np.array([6], np.float32),  # longest prefix wins
        "mtp_like": np.array([7], np.int8),  # "mtp_like" does not start with "mtp."
    }
    router.load_weights(stream("numpy", new))
    assert mtp.state["w"].tolist() == [1, 2, 3] and main.state["w"].tolist() == [4, 5]
    assert head.state["w"].tolist() == [6] and main.state["mtp_like"].tolist() == [7]
    dest = router.destination("mtp.w")
    assert dest is not None and np.shares_memory(dest, mtp.state["w"])
    assert router.destination("nothing") is None


def test_router_errors() -> None:
    router = PrefixRouter({"mtp.": NumpySink({"w": np.zeros(1, np.float32)})})
    with pytest.raises(ManifestMismatch, match=r"'main.w'.*mtp.*default="):
        router.load_weights(stream("numpy", {"main.w": np.zeros(1, np.float32)}))
    with pytest.raises(ManifestMismatch, match="'x'"):  # the child's own error, stripped name
        router.load_weights(stream("numpy", {"mtp.x": np.zeros(1, np.float32)}))
    with pytest.raises(WeightstreamError, match="at least one"):
        PrefixRouter({})

    class NoLoadOne:
        framework = "numpy"

        def param_specs(self) -> dict[str, Any]:
            return {}

        def load_weights(self, weights: Any) -> None: ...

    with pytest.raises(WeightstreamError, match="load_one"):
        PrefixRouter({"a.": NoLoadOne()})
    with pytest.raises(WeightstreamError, match="sink: expected"):
        PrefixRouter({"a.": 42})


def test_router_rejects_mixed_frameworks() -> None:
    pytest.importorskip("torch")
    with pytest.raises(WeightstreamError, match=r"one framework, got \['numpy', 'torch'\]"):
        PrefixRouter({"mtp.": torch_model()}, default={"w": np.zeros(1, np.float32)})


def test_router_over_torch_modules() -> None:
    torch = pytest.importorskip("torch")
    main, mtp = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1, bias=False)
    router = PrefixRouter({"mtp.": mtp}, default=main)
    assert set(router.param_specs()) == {"weight", "bias", "mtp.weight"}
    router.load_weights(
        stream("torch", {"weight": np.ones((2, 2), np.float32), "mtp.weight": np.full((1, 2), 2, np.float32)})
    )
    assert main.weight.detach().tolist() == [[1, 1], [1, 1]] and mtp.weight.detach().tolist() == [[2, 2]]


def test_as_sink_rejects_unknown() -> None:
    with pytest.raises(WeightstreamError, match=r"torch.nn.Module, paddle.nn.Layer"):
        as_sink([1, 2])
    sink = NumpySink()
    assert as_sink(sink) is sink
