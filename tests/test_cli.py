"""The ``weightstream`` command line for real: ``python -m weightstream`` in its own process, and
typer's CliRunner in this one. --version, every command's help (also with NO_COLOR and a narrow
terminal), a tiny demo (spawned receivers, every byte checked) with and without its progress bar,
the smallest bench under both of its names, and bad command lines exiting 2 with the option named."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import weightstream
from weightstream import native
from weightstream.cli import BENCHES, app, main
from weightstream.demo import DemoConfig, run_demo

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEMO_OPTIONS = ("--size-gib", "--receivers", "--versions", "--bucket-mib", "--buffers", "--framework", "--seed")
TINY_DEMO = ("demo", "--size-gib", "0.01", "--versions", "2", "--receivers", "1", "--bucket-mib", "4")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    """``python -m weightstream ARGS`` from the checkout, with ``env`` over a copy of this environment."""
    full = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "COLUMNS", "TTY_COMPATIBLE")}
    return subprocess.run([sys.executable, "-m", "weightstream", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**full, **(env or {})})


# --- --version ------------------------------------------------------------------------------


def test_version_names_weightstream_python_and_the_c_modules() -> None:
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"weightstream {weightstream.__version__} ("), lines
    assert lines[1].startswith(f"Python {platform.python_version()} "), lines
    state = lines[2]
    stems = sorted(p.stem for p in (Path(native.__file__).parent).glob("_*.pyi"))
    assert state.startswith("C modules: ") and stems, state
    if native.BUILT:
        assert state.startswith(f"C modules: {', '.join(stems)} loaded"), state
    else:
        assert "not built" in state, state


def test_version_says_when_the_c_modules_are_turned_off() -> None:
    if not native.BUILT:
        pytest.skip("the C modules are not built here")
    proc = cli("--version", env={"WEIGHTSTREAM_PURE_PYTHON": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "turned off by WEIGHTSTREAM_PURE_PYTHON: spans, layout" in proc.stdout, proc.stdout


def test_main_returns_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """The entry point's contract: an int, never a SystemExit out of it."""
    assert main(["--version"]) == 0
    assert main(["demo", "--receivers", "0"]) == 2
    captured = capsys.readouterr()
    assert f"weightstream {weightstream.__version__}" in captured.out and "'--receivers'" in captured.err


# --- help -----------------------------------------------------------------------------------

HELPS = {
    (): ("demo", "bench", "snapshot", "status", "--version", "--help"),
    ("demo",): DEMO_OPTIONS,
    ("bench",): tuple(BENCHES),
    ("snapshot",): ("Usage:",),
    ("status",): ("Usage:",),
    **{("bench", name): (f"usage: weightstream bench {name}",) for name in BENCHES},
    ("bench", "engine"): ("usage: weightstream bench engine", "--quick", "--shapes", "--modes", "--repeats"),
    ("bench", "handoff"): ("usage: weightstream bench handoff", "--quick", "--size-mib", "--readers", "--repeats"),
    ("bench", "throughput"): ("usage: weightstream bench throughput", "--quick", "--methods", "--no-plot"),
}


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1", "COLUMNS": "40"}], ids=["plain", "no-color-narrow"])
@pytest.mark.parametrize("command", list(HELPS), ids=lambda c: " ".join(c) or "weightstream")
def test_every_help_renders_and_names_its_options(command: tuple[str, ...], env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env=env, prog_name="weightstream")
    out = result.stdout
    assert result.exit_code == 0, f"{out}\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in out and "\x1b[" not in out, out
    missing = [word for word in HELPS[command] if word not in out]
    assert not missing, f"`weightstream {' '.join(command)} --help` does not name {missing}:\n{out}"
    if len(command) < 2:  # weightstream's own help, not a bench's (argparse's, with its docstring)
        # click's layout wraps to the width (CliRunner's is 80; a narrow terminal's in the next test)
        # and never cuts a name short
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert "…" not in out, out


def test_help_in_its_own_process_with_no_color_and_a_narrow_terminal() -> None:
    for command in ((), ("demo",), ("bench",)):
        proc = cli(*command, "--help", env={"NO_COLOR": "1", "COLUMNS": "40"})
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        assert "\x1b[" not in proc.stdout and max(len(line) for line in proc.stdout.splitlines()) <= 50, proc.stdout
    assert all(option in proc.stdout for option in ("engine", "handoff", "throughput"))


# --- bad command lines ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--bogus",), "--bogus"),
        (("frobnicate",), "frobnicate"),
        (("demo", "--receivers", "0"), "'--receivers'"),
        (("demo", "--versions", "many"), "'--versions'"),
        (("demo", "--bogus"), "--bogus"),
        (("bench", "nosuchbench"), "nosuchbench"),
        (("bench", "handoff", "--bogus"), "--bogus"),
        (("bench", "handoff", "--size-mib", "0"), "--size-mib"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_a_bad_command_line_exits_2_naming_what_is_wrong(args: tuple[str, ...], named: str) -> None:
    proc = cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def own_segments(pid: int) -> set[str]:
    """The /dev/shm segments process ``pid`` made: weightstream's slots, the handoff's and the
    handles peer's files (each name carries its creator's pid; other sessions share /dev/shm)."""
    marks = (f"ws_{pid}_", f"ws-handoff-{pid}-", f"wsbench_{pid}_")
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(marks)}


# Found by an outside-in trial: each was a traceback, a run that started anyway, or an exit 1.
REFUSED = [
    (("demo", "--size-gib", "inf"), "'--size-gib'", "got inf"),
    (("demo", "--size-gib", "nan"), "'--size-gib'", "got nan"),
    (("demo", "--size-gib", "1e6"), "'--size-gib'", "available; fix: --size-gib"),
    (("demo", "--seed", "-5"), "'--seed'", "got -5"),
    (("demo", "--versions", "99999999999999999999"), "'--versions'", "got 99999999999999999999"),
    (("demo", "--buffers", "100000"), "'--buffers'", "from 1 to 64, got 100000"),
    (("demo", "--bucket-mib", "1000000"), "'--bucket-mib'", "of /dev/shm"),
    (("status", "--timeout", "1e12", "ipc:///nonexistent/s.sock"), "'--timeout'", "3600"),
    (("status", "--timeout", "inf", "ipc:///nonexistent/s.sock"), "'--timeout'", "3600"),
    (("bench", "engine", "--receivers", "0"), "--receivers", "got 0"),
    (("bench", "engine", "--receivers", "abc"), "--receivers", "got 'abc'"),
    (("bench", "engine", "--modes", "bogus"), "--modes", "'bogus'"),
    (("bench", "engine", "--modes", "numpy:bogus"), "--modes", "'bogus'"),
    (("bench", "engine", "--repeats", "0"), "--repeats", "got 0"),
    (("bench", "engine", "--shapes", "bogus"), "--shapes", "'bogus'"),
    (("bench", "throughput", "--shapes", "large,bogus"), "--shapes", "'bogus'"),
    (("bench", "throughput", "--methods", "naive,bogus"), "--methods", "'bogus'"),
    (("bench", "throughput", "--buffers", "1,65"), "--buffers", "got 65"),
    (("bench", "throughput", "--receivers", "1,x"), "--receivers", "'1,x'"),
    (("bench", "throughput", "--versions", "0"), "--versions", "got 0"),
    (("bench", "handoff", "--readers", "0"), "--readers", "got 0"),
    (("bench", "handoff", "--repeats", "-1"), "--repeats", "got -1"),
    (("bench", "checksum-cost", "--buffers", "0"), "--buffers", "got 0"),
    (("bench", "checksum-cost", "--size-mib", "huge"), "--size-mib", "got 'huge'"),
    (("bench", "crosshost", "--transports", "udp"), "--transports", "'udp'"),
    (("bench", "crosshost", "--ranks", "0"), "--ranks", "got 0"),
    (("bench", "crosshost", "--buckets", "0"), "--buckets", "got 0"),
    (("bench", "zmq-frame-cliff", "--frames-mib", "0"), "--frames-mib", "got 0"),
    (("bench", "zmq-frame-cliff", "--frames-mib", "16,inf"), "--frames-mib", "got inf"),
    (("bench", "zmq-frame-cliff", "--total-mib", "0"), "--total-mib", "got 0"),
]


@pytest.mark.parametrize(("args", "named", "said"), REFUSED, ids=[" ".join(args) for args, _, _ in REFUSED])
def test_a_bad_value_exits_2_naming_the_option_before_anything_starts(
    args: tuple[str, ...], named: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (the benches run here too, as `weightstream bench` runs them): exit 2, the
    option, what was expected and what came; no model built, no rank spawned, no segment made."""
    before = own_segments(os.getpid())
    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    flat = " ".join(err.split())  # click wraps its message at the terminal's width
    assert named in err and said in flat and "Traceback" not in err, err
    assert "model:" not in out and "==" not in out, f"the run started:\n{out}"
    assert own_segments(os.getpid()) == before


@pytest.mark.parametrize(
    "command",
    [("-m", "weightstream", "bench", "engine", "--shapes", "bogus"), ("-m", "bench.engine", "--shapes", "bogus"),
     ("-m", "weightstream", "demo", "--buffers", "100000")],
    ids=["weightstream bench engine", "python -m bench.engine", "weightstream demo"],
)
def test_a_bad_value_in_its_own_process_exits_2_and_leaves_no_segment(command: tuple[str, ...]) -> None:
    proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, out + err
    assert ("--shapes" in err or "'--buffers'" in err) and "Traceback" not in err, err
    assert not own_segments(proc.pid), "the bench left shared-memory segments behind"


def test_a_bench_that_fails_half_way_removes_the_segments_it_made(tmp_path: Path) -> None:
    """Every bench runs under bench.options.segments_removed: a sender made and never closed (an
    exception raised between the two) leaves nothing in /dev/shm."""
    from bench.options import segments_removed
    from weightstream import BucketSender

    before = own_segments(os.getpid())
    made: list[BucketSender] = []
    counted: list[int] = []

    def bench() -> None:
        with segments_removed():
            made.append(BucketSender(f"ipc://{tmp_path}/s.sock", receivers=1, bucket_bytes=1 << 20, num_buffers=2))
            counted.append(len(own_segments(os.getpid()) - before))
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        bench()
    assert counted == [2], "the sender made no slots to leave behind"
    assert own_segments(os.getpid()) == before
    (sender,) = made
    sender.close()  # its sockets; the slots it would unlink are gone already


@pytest.mark.parametrize("name", list(BENCHES))
def test_a_bench_help_says_both_ways_to_run_it_and_no_duration(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`weightstream bench NAME`, or `python -m bench.MODULE` from a checkout; no run time, which
    differs from machine to machine (README's and the bench's disagreed)."""
    assert main(["bench", name, "--help"]) == 0
    out = capsys.readouterr().out
    module = BENCHES[name][0]
    assert f"weightstream bench {name} " in out and f"python -m bench.{module}" in out, out
    assert not re.search(r"~\s*\d|\d\s*(min|minutes|seconds)\b", out), out


def test_no_command_shows_the_help_and_exits_2() -> None:
    proc = cli(timeout=60)
    assert proc.returncode == 2 and "Usage: weightstream" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# --- demo -----------------------------------------------------------------------------------


def test_a_tiny_demo_streams_and_verifies_with_plain_output() -> None:
    """stdout is a pipe: the demo's own lines only, no progress bar and no escape codes."""
    proc = cli(*TINY_DEMO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verification OK" in proc.stdout and proc.stdout.count("digests OK") == 2, proc.stdout
    assert "\x1b[" not in proc.stdout and "demo:" not in proc.stdout, proc.stdout


def test_a_tiny_demo_on_a_terminal_draws_its_progress_bar() -> None:
    """FORCE_COLOR makes rich treat the pipe as a terminal: the progress display runs, the demo's
    lines still come through, and the bar ends on every version verified."""
    proc = cli(*TINY_DEMO, env={"FORCE_COLOR": "1", "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plain = ANSI.sub("", proc.stdout)
    assert "\x1b[" in proc.stdout, "no terminal output: the progress path did not run"
    assert "verification OK" in plain and plain.count("digests OK") == 2, plain
    assert "demo: verified" in plain and "2/2" in plain, plain


def test_the_demo_reports_progress_per_version() -> None:
    seen: list[tuple[int, int, str]] = []
    code = run_demo(DemoConfig(size_gib=0.01, receivers=1, versions=2, bucket_mib=4), progress=lambda *a: seen.append(a))
    assert code == 0
    assert all(total == 2 for _, total, _ in seen), seen
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 2, seen
    assert [stage for d, _, stage in seen if stage.endswith("verified")] == ["step_0 verified", "step_1 verified"], seen


# --- bench ----------------------------------------------------------------------------------


def test_the_smallest_bench_runs_through_the_cli() -> None:
    proc = cli("bench", "handoff", "--quick", "--size-mib", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "readers=1: best" in proc.stdout and "memcpy 8 MiB" in proc.stdout, proc.stdout


def test_the_bench_keeps_its_checkout_name() -> None:
    """README's and docs/benchmarks.md's ``python -m bench.<name>`` from a checkout."""
    proc = subprocess.run([sys.executable, "-m", "bench.handoff", "--quick", "--size-mib", "8"], capture_output=True,
                          text=True, timeout=100, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "readers=1: best" in proc.stdout, proc.stdout


def test_a_bench_that_spawns_ranks_runs_through_the_cli(tmp_path: Path) -> None:
    """throughput's ranks are spawned processes that import the bench's modules by the name the
    CLI loaded them under; its results go where WEIGHTSTREAM_BENCH_RESULTS says."""
    proc = cli("bench", "throughput", "--shapes", "large", "--methods", "weightstream", "--receivers", "1",
               "--size-mib", "16", "--versions", "1", "--buckets", "4", "--no-plot",
               env={"WEIGHTSTREAM_BENCH_RESULTS": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weightstream[b4M" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
    assert len(list(tmp_path.glob("*.json"))) == 1, sorted(tmp_path.iterdir())
