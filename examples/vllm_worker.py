"""A vLLM worker extension that streams weights from the trainer into the engine's own model.

vLLM loads it by dotted name and mixes it into every Worker:

    llm = LLM(model=..., worker_extension_cls="vllm_worker.WeightstreamWorkerExtension")
    llm.collective_rpc("start_weightstream", args=("ipc:///tmp/ws-1000/vllm.sock",))
    ...                                      # the trainer pushes "step_1" (HF names, unfused)
    llm.collective_rpc("wait_weightstream_version", args=("step_1", 120))
    llm.collective_rpc("stop_weightstream")

Each worker runs a ReceiverDaemon whose ``load_weights`` is the engine model's own: the trainer
sends Hugging Face names (q_proj/k_proj/v_proj, gate_proj/up_proj) and vLLM's stacked-params
mapping copies each into its shard of the fused qkv_proj/gate_up_proj. The manifest is checked
against the Hugging Face names that model loads (``expected=``) before a byte is written.
Updates land in place while the engine runs, so pause generation around a push; with
``staged=True`` the model changes only at COMMIT, once every rank holds every byte, so a push
that fails midway never leaves a torn model.

Run it here against the stand-in engine of examples/vllm_model.py (a small Llama, CPU), with
the sharded trainer of examples/trainer_loop.py, in three shells:

    python examples/vllm_worker.py --endpoint ipc:///tmp/ws-$UID/vllm.sock --rank 0 --steps 2
    python examples/vllm_worker.py --endpoint ipc:///tmp/ws-$UID/vllm.sock --rank 1 --steps 2
    python examples/trainer_loop.py --endpoint ipc:///tmp/ws-$UID/vllm.sock --ranks 2 --steps 2
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from torch import nn

from weightstream import ConfigError, ReceiverDaemon


def hf_param_specs(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{Hugging Face name: (dtype, shape)}`` of what ``model.load_weights`` takes.

    Each fused parameter is split back into the unfused tensors the trainer sends, by two
    attributes vLLM models and layers have: the model's ``packed_modules_mapping``
    (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}``) and the fused layer's
    ``output_sizes`` (rows of each part). Every other parameter is taken as it is.
    """
    packed: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    modules = dict(model.named_modules())
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, param in model.named_parameters():  # a tied lm_head is listed once, under the embedding
        dtype = str(param.dtype).removeprefix("torch.")
        owner, _, leaf = name.rpartition(".")
        parent, _, fused = owner.rpartition(".")
        parts = packed.get(fused)
        if not parts:
            specs[name] = (dtype, tuple(param.shape))
            continue
        sizes = getattr(modules[owner], "output_sizes", None)
        if sizes is None or len(sizes) != len(parts):
            raise ConfigError(
                f"parameter {name!r}: expected its layer to give the rows of {parts} in output_sizes, got {sizes!r}; "
                "fix: a fused layer (vLLM's MergedColumnParallelLinear / QKVParallelLinear) of packed_modules_mapping"
            )
        for weight, rows in zip(parts, sizes):
            specs[f"{parent}.{weight}.{leaf}"] = (dtype, (int(rows), *param.shape[1:]))
    return specs


class WeightstreamWorkerExtension:
    """Mixed into vLLM's Worker, which provides ``self.model_runner.model`` and ``self.rank``.

    Every method returns plain data: ``collective_rpc`` sends results between processes.
    """

    model_runner: Any  # the Worker's
    rank: int  # the Worker's
    _weightstream: ReceiverDaemon | None = None

    def start_weightstream(
        self, endpoint: str, rank: int | None = None, *, staged: bool = False, prefetch: int = 2,
        heartbeat_timeout: float | None = None, expected: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    ) -> dict[str, Any]:
        """Connect this worker to the trainer's sender as ``rank`` (default: the worker's rank; give each
        engine's workers their own when several engines share one sender).

        ``expected``: the ``{name: (dtype, shape)}`` the trainer sends, for the manifest check;
        default :func:`hf_param_specs` of the model, which holds for whole parameters (tensor
        parallel size 1). Under tensor parallelism pass the trainer's own specs.
        """
        if self._weightstream is not None:
            raise ConfigError(
                f"start_weightstream({endpoint!r}): expected a worker not streaming yet, got one connected to "
                f"{self._weightstream.endpoint!r}; fix: call stop_weightstream first"
            )
        model = self.model_runner.model
        daemon = ReceiverDaemon(
            endpoint, model.load_weights, rank=self.rank if rank is None else rank, framework="torch",
            expected=hf_param_specs(model) if expected is None else expected, staged=staged, prefetch=prefetch, heartbeat_timeout=heartbeat_timeout,
        )
        daemon.start()
        self._weightstream = daemon
        return self._weightstream_status()

    def wait_weightstream_version(self, version: str, timeout: float) -> dict[str, Any]:
        """Block until ``version`` is committed on this worker; return what the engine logs."""
        self._daemon("wait_weightstream_version").wait_for_version(version, timeout)
        return self._weightstream_status()

    def stop_weightstream(self) -> dict[str, Any]:
        """Disconnect (a version in flight is aborted); the model keeps the last committed weights."""
        status = self._weightstream_status()
        self._daemon("stop_weightstream").stop()
        self._weightstream = None
        return status

    def _daemon(self, method: str) -> ReceiverDaemon:
        if self._weightstream is None:
            raise ConfigError(f"{method}: expected a worker that is streaming, got none; fix: call start_weightstream first")
        return self._weightstream

    def _weightstream_status(self) -> dict[str, Any]:
        daemon = self._daemon("status")
        status = daemon.status
        return {
            "rank": daemon.rank, "version": status.committed_version, "state": status.state,
            "model_intact": status.model_intact, "connected": status.connected, "last_error": status.last_error,
        }


def main() -> int:
    # beside this script (its directory is on sys.path, so the engine finds "vllm_worker" by name too)
    from model import CONFIG, PROMPT  # examples/model.py: the config the trainer's model has
    from vllm_model import LLM  # examples/vllm_model.py: the stand-in engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="the trainer's ipc:// endpoint")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2, help="serve until step_N is committed")
    ap.add_argument("--staged", action="store_true", help="change the model only at COMMIT")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    llm = LLM(CONFIG, worker_extension_cls="vllm_worker.WeightstreamWorkerExtension", rank=args.rank)
    llm.collective_rpc("start_weightstream", args=(args.endpoint,), kwargs={"staged": args.staged})
    try:
        for step in range(1, args.steps + 1):
            (status,) = llm.collective_rpc("wait_weightstream_version", args=(f"step_{step}", 120))
            tokens = llm.generate(PROMPT[0], max_new_tokens=4)
            print(f"rank {status['rank']}: serving {status['version']} (model intact: {status['model_intact']}); "
                  f"generated {tokens}", flush=True)
    finally:
        llm.collective_rpc("stop_weightstream")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
