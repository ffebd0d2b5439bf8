"""The GPU-free half of the ``cuda_ipc`` transport: slot descriptors, device identity, error texts.

Kept apart from :mod:`.cuda_ipc` because that module refuses to import without a
CUDA device (so ``available_transports()`` does not offer it); everything here
imports and runs on any machine, and is what the tests exercise without a GPU.

A slot descriptor is a small map of scalars, never a framework-private tuple:
``{"handle": <64 raw bytes of cudaIpcMemHandle_t>, "size": int, "device": "GPU-<uuid>",
"pid": int}``. The device is named by UUID because ranks see different
``CUDA_VISIBLE_DEVICES`` and so different indices for the same GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ...errors import TransportError

log = logging.getLogger("weightstream.cuda_ipc")

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t) == CUDA_IPC_HANDLE_SIZE
UUID_PREFIX = "GPU-"
_MAX_SLOT = 1 << 40  # 1 TiB: a sanity bound, far above any bucket
_KEYS = ("handle", "size", "device", "pid")


@dataclass(frozen=True)
class SlotDescriptor:
    handle: bytes
    size: int
    device: str
    pid: int

    def to_wire(self) -> dict[str, Any]:
        return {"handle": self.handle, "size": self.size, "device": self.device, "pid": self.pid}


def encode_descriptor(handle: bytes, size: int, device: str, pid: int) -> dict[str, Any]:
    """The wire map of one exported slot; validated like the receiver would."""
    return decode_descriptor({"handle": handle, "size": size, "device": device, "pid": pid}).to_wire()


def decode_descriptor(desc: Any) -> SlotDescriptor:
    """Check a received descriptor field by field; TransportError says what was expected."""
    if not isinstance(desc, dict):
        raise TransportError(f"cuda_ipc slot descriptor: expected a map, got {type(desc).__name__}")
    missing = [k for k in _KEYS if k not in desc]
    if missing:
        raise TransportError(
            f"cuda_ipc slot descriptor: missing {missing}, expected keys {list(_KEYS)}; "
            "sender and receiver run different weightstream versions?"
        )
    handle, size, device, pid = (desc[k] for k in _KEYS)
    if not isinstance(handle, bytes) or len(handle) != HANDLE_BYTES:
        got = f"{len(handle)} bytes" if isinstance(handle, bytes) else type(handle).__name__
        raise TransportError(f"cuda_ipc slot descriptor: 'handle' must be {HANDLE_BYTES} raw bytes, got {got}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= _MAX_SLOT:
        raise TransportError(f"cuda_ipc slot descriptor: 'size' must be an int in 1..{_MAX_SLOT}, got {size!r:.40}")
    if not isinstance(device, str) or not device.startswith(UUID_PREFIX) or len(device) > 64:
        raise TransportError(
            f"cuda_ipc slot descriptor: 'device' must be a GPU UUID like 'GPU-xxxxxxxx-...', got {device!r:.80}"
        )
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise TransportError(f"cuda_ipc slot descriptor: 'pid' must be a positive int, got {pid!r:.40}")
    return SlotDescriptor(handle, size, device, pid)


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes as nvidia-smi prints them: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``."""
    if len(raw) != 16:
        raise TransportError(f"GPU UUID: expected 16 bytes, got {len(raw)}")
    h = raw.hex()
    return f"{UUID_PREFIX}{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# cudaError_t name -> the fix to print with it (names checked against cuda-bindings 13.5).
_FIXES = {
    "cudaErrorInsufficientDriver": (
        "no NVIDIA driver, or one older than this cuda-bindings needs; install the driver, or "
        "pip install the cuda-bindings major matching the driver's CUDA version (e.g. 'cuda-bindings==12.*')"
    ),
    "cudaErrorNoDevice": "no GPU is visible: check CUDA_VISIBLE_DEVICES / the container's --gpus",
    "cudaErrorDevicesUnavailable": "the GPU is in exclusive-process compute mode or busy: nvidia-smi -c DEFAULT",
    "cudaErrorNotSupported": (
        "CUDA IPC is not supported here (WSL, some vGPU/MIG setups, or a non-Linux host); use transport='shm'"
    ),
    "cudaErrorDeviceUninitialized": (
        "an IPC handle cannot be opened in the process that created it (invalid context); "
        "use transport='shm' or run the receiver in a second process"
    ),
    "cudaErrorMapBufferObjectFailed": (
        "the slot could not be mapped: the sender freed it or exited, or the processes do not share "
        "an IPC namespace (docker: --ipc=host)"
    ),
    "cudaErrorInvalidResourceHandle": "the handle is stale: the sender freed the slot or exited; reconnect",
    "cudaErrorTooManyPeers": "too many peer mappings on this GPU; use fewer ranks per GPU",
    "cudaErrorPeerAccessUnsupported": "the GPUs cannot access each other (no P2P); put sender and rank on one GPU",
    "cudaErrorMemoryAllocation": "out of GPU memory; lower bucket_bytes or num_buffers",
}


def cuda_error_message(what: str, name: str, text: str = "") -> str:
    """``what`` failed with the CUDA error ``name``: message with the fix."""
    fix = _FIXES.get(name, "see the CUDA error above; use transport='shm' to bypass the GPU")
    detail = f" ({text})" if text else ""
    return f"{what} failed: {name}{detail}; fix: {fix}"


def expandable_segments_note() -> str | None:
    """Why ``expandable_segments:True`` is fine here, or None when it is not set."""
    conf = ",".join(os.environ.get(v, "") for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if "expandable_segments:true" not in conf.replace(" ", "").lower():
        return None
    return (
        "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True: fine for weightstream's cuda_ipc "
        "(its slots are plain cudaMalloc, and the trainer's tensors are only read inside this process); "
        "it only breaks sharing torch's own tensors by legacy CUDA IPC (torch.multiprocessing)"
    )


def device_identity() -> str:
    """UUID of this thread's current CUDA device, or "" without cuda-bindings, driver or GPU.

    The current device is per host thread: call it on the thread that did
    ``torch.cuda.set_device`` (e.g. when the daemon is constructed), not on the
    daemon's loop thread.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return ""
    try:
        err, index = cudart.cudaGetDevice()
        if err != cudart.cudaError_t.cudaSuccess:
            return ""
        err, prop = cudart.cudaGetDeviceProperties(index)
        if err != cudart.cudaError_t.cudaSuccess:
            return ""
        return format_uuid(bytes(prop.uuid.bytes))
    except Exception as exc:  # an odd driver must never break HELLO
        log.debug("device_identity: %s", exc)
        return ""
