"""``weightstream demo`` end to end: real sender, two spawned receivers, digests compared."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_demo_cli_streams_and_verifies_bit_exact() -> None:
    # 8 MiB buckets: the synthetic embedding is larger than one bucket, so chunking runs too
    cmd = [sys.executable, "-m", "weightstream", "demo", "--size-gib", "0.05", "--versions", "2", "--bucket-mib", "8"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "verification OK" in out, out
    assert "chunked" in out, out
    assert out.count("digests OK") == 2, out


@pytest.mark.parametrize(("option", "value"), [("--receivers", "0"), ("--size-gib", "0"), ("--framework", "jax")])
def test_demo_cli_rejects_bad_arguments(option: str, value: str) -> None:
    """Exit 2 before anything starts, with a message that names the option."""
    proc = subprocess.run(
        [sys.executable, "-m", "weightstream", "demo", option, value], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"'{option}'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "model:" not in proc.stdout, "the demo started"


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [("size_gib", float("inf"), "got inf"), ("size_gib", 1e6, "GiB available"), ("seed", -5, "got -5"),
     ("versions", 10**20, "got 100000000000000000000"), ("buffers", 100_000, "got 100000"),
     ("bucket_mib", 1_000_000, "of /dev/shm"), ("framework", "jax", "got 'jax'")],
)
def test_run_demo_refuses_a_config_before_building_anything(field: str, value: object, said: str) -> None:
    """The library path (DemoConfig, run_demo): a ConfigError naming the field, what was expected
    and what came, raised before a model is built or a receiver spawned (no progress reported)."""
    from weightstream.demo import DemoConfig, DemoConfigError, run_demo
    from weightstream.protocol.errors import ConfigError

    stages: list[str] = []
    with pytest.raises(DemoConfigError) as caught:
        run_demo(DemoConfig(**{field: value}), progress=lambda done, total, stage: stages.append(stage))
    assert isinstance(caught.value, ConfigError)
    assert caught.value.field == field and caught.value.option == "--" + field.replace("_", "-")
    assert str(caught.value).startswith(f"DemoConfig.{field}: ") and said in str(caught.value), caught.value
    assert "; fix: " in str(caught.value), caught.value
    assert not stages, f"the demo started: {stages}"


def test_a_small_demo_config_passes_and_counts_what_it_needs() -> None:
    """The memory counted: the sender's three copies of the model (while it times memcpy) and the slots."""
    from weightstream.demo import DemoConfig, check_config, model_bytes, needs

    cfg = DemoConfig(size_gib=0.01, receivers=1, bucket_mib=4)
    check_config(cfg)
    ram, shm = needs(cfg)
    assert shm == 2 * (4 << 20)
    assert ram >= 3 * model_bytes(cfg) + shm
