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
