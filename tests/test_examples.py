"""examples/ run as written: a trainer script and two rank scripts (one on the CPU, one built on
the meta device) in their own processes, as a user would start them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(180)
def test_trainer_and_two_ranks_as_written(endpoint: str) -> None:
    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ranks = [
        start(str(EXAMPLES / "rank.py"), "--endpoint", endpoint, "--rank", "0", "--steps", "2"),
        start(str(EXAMPLES / "rank.py"), "--endpoint", endpoint, "--rank", "1", "--steps", "2", "--meta"),
    ]
    trainer = start(str(EXAMPLES / "trainer.py"), "--endpoint", endpoint, "--ranks", "2", "--steps", "2")
    try:
        out, _ = trainer.communicate(timeout=150)
        assert trainer.returncode == 0, out
        assert "step 2:" in out and "to 2 rank(s)" in out, out
        outputs = []
        for rank in ranks:
            text, _ = rank.communicate(timeout=60)
            assert rank.returncode == 0, text
            outputs.append(text)
        for rank, text in enumerate(outputs):
            assert f"rank {rank}: serving step_2 (model intact: True)" in text, text
        generated = [line.rsplit("generated", 1)[1] for text in outputs for line in text.splitlines() if "step_2" in line]
        assert len(generated) == 2 and generated[0] == generated[1]  # both ranks serve the trainer's weights
    finally:
        for proc in (trainer, *ranks):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
