"""The ``weightstream`` command line (typer for commands and help, rich for output).

    weightstream --version                  # weightstream, Python, which C modules loaded
    weightstream demo                       # stream a synthetic model to receiver processes, verify every byte
    weightstream bench engine --quick       # a benchmark from the installed package (weightstream.bench)
    weightstream snapshot ls|verify|prune DIR
    weightstream status ENDPOINT

``main(argv)`` is the entry point (the ``weightstream`` script and ``python -m weightstream``);
it returns the exit code: 0 done, 1 failed, 2 a bad command line (an option click refuses, or a
ConfigError). On a terminal the long commands draw a rich progress display; in a pipe or a log
they print their own lines only.
"""

from __future__ import annotations

import importlib
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .. import demo as demo_lib
from ..protocol.errors import ConfigError, WeightstreamError
from ..protocol.messages import MAX_SLOTS
from . import snapshot
from .status import status_command

app = typer.Typer(
    name="weightstream",
    help="Stream model weights from an RL trainer into inference ranks. `weightstream COMMAND --help` for a command's options.",
    no_args_is_help=True,
    add_completion=False,
    # click's own help layout: it wraps at any width (rich's panels cut option names short on a
    # narrow terminal) and has no colour to turn off under NO_COLOR
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # never print a frame's locals: they can hold tensors and keys
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(
    help="Run a benchmark shipped with weightstream (the package weightstream.bench; from a checkout, also "
    "`python -m bench.NAME`). Every argument after NAME goes to the bench unchanged: `weightstream bench NAME --help` "
    "lists its options. Results go to $WEIGHTSTREAM_BENCH_RESULTS, else bench/results in a checkout, else "
    "./bench-results.",
    short_help="Run a benchmark shipped with weightstream.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# CLI name -> (module of weightstream.bench, what it measures). Each module has main(argv, prog) -> int,
# whose parser (--help, --quick where the bench has it) takes the command line after the name.
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("engine", "Engine-style load_weights against the two-copy limit."),
    "throughput": ("throughput", "Pushes against memcpy, the two-copy pipeline and peers."),
    "handoff": ("handoff", "The two-copy yardstick alone: shm handoffs by slot size."),
    "checksum-cost": ("checksum_cost", "What checksum=True costs a push."),
    "crosshost": ("crosshost", "TCP and gloo on loopback against bare ZeroMQ and gloo."),
    "zmq-frame-cliff": ("zmq_frame_cliff", "ZeroMQ's loopback TCP throughput by frame size."),
}


def _console(stderr: bool = False) -> Console:
    # soft_wrap: lines are never broken at the terminal's width (a log reads as printed)
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


@contextmanager
def _progress(console: Console, counted: bool = True) -> Iterator[Progress]:
    """A progress display on ``console``; what the work prints meanwhile goes above it. ``counted``:
    steps done of a known total, kept on screen at the end; else a pulse and the time, gone at the end."""
    count = (MofNCompleteColumn(),) if counted else ()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), *count, TimeElapsedColumn())
    with Progress(*columns, console=console, transient=not counted) as progress:
        yield progress


# --- --version ----------------------------------------------------------------------------


def version_text() -> str:
    """weightstream's version and where it was imported from, Python's, and each C module's state."""
    import weightstream
    from weightstream import native

    lines = [
        f"weightstream {weightstream.__version__} ({Path(weightstream.__file__).resolve().parent})",
        f"Python {platform.python_version()} ({platform.python_implementation()}, {platform.system()} {platform.machine()})",
    ]
    stems = sorted(p.stem for p in Path(native.__file__).parent.glob("_*.pyi"))  # one stub per C module, always shipped
    loaded, missing = [], []
    for stem in stems:
        try:
            importlib.import_module(f"weightstream.native.{stem}")
        except ImportError:
            missing.append(stem)
        else:
            loaded.append(stem)
    state = f"C modules: {', '.join(loaded) or 'none'} loaded"
    if missing:
        state += f"; {', '.join(missing)} not built (pure-Python paths: same bytes, slower per tensor)"
    off = [name for name, on in (("spans", native.SPANS), ("layout", native.LAYOUT)) if not on]
    if loaded and off:
        state += f"; turned off by WEIGHTSTREAM_PURE_PYTHON: {', '.join(off)}"
    lines.append(state)
    return "\n".join(lines)


def _show_version(value: bool) -> None:
    if value:
        _console().print(version_text(), markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Show weightstream's version, Python's, and which C modules loaded; exit.",
                           callback=_show_version, is_eager=True)
    ] = False,
) -> None:
    """Stream model weights from an RL trainer into inference ranks over shared memory and ZeroMQ."""


# --- demo -----------------------------------------------------------------------------------


class Framework(str, Enum):
    """The tensor type the demo hands to push."""

    numpy = "numpy"
    torch = "torch"
    paddle = "paddle"


# Each option's range and this machine's limits are checked by demo.check_config (its messages say
# what came, which typer's own range checks do not), so the options here only convert.
@app.command(short_help="Stream a synthetic model to receivers; verify every byte.")
def demo(
    size_gib: Annotated[float, typer.Option("--size-gib", help="Model size in GiB (> 0).")] = 1.0,
    receivers: Annotated[
        int, typer.Option("--receivers", help=f"Receiver processes, 1 to {demo_lib.MAX_RECEIVERS}.")
    ] = 2,
    versions: Annotated[int, typer.Option("--versions", help=f"Versions to push, 1 to {demo_lib.MAX_VERSIONS}.")] = 3,
    bucket_mib: Annotated[int, typer.Option("--bucket-mib", help="Bucket size in MiB (>= 1).")] = 256,
    buffers: Annotated[int, typer.Option("--buffers", help=f"Bucket slots in flight, 1 to {MAX_SLOTS}.")] = 2,
    framework: Annotated[Framework, typer.Option("--framework", help="Tensor type handed to push.")] = Framework.numpy,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the synthetic model (>= 0).")] = 0,
) -> None:
    """Stream a synthetic model to receiver processes and verify every byte.

    The sender runs here, each receiver in its own process; after each version every receiver's
    xxh3 digest of each tensor is compared with the sender's. Exit 0 only if all matched. A model
    or buckets larger than this machine's free memory or /dev/shm are refused before anything starts."""
    cfg = demo_lib.DemoConfig(size_gib, receivers, versions, bucket_mib, buffers, framework.value, seed)
    try:
        demo_lib.check_config(cfg)  # the limits of this machine, before the model is built
    except demo_lib.DemoConfigError as exc:
        raise typer.BadParameter(exc.detail, param_hint=f"'{exc.option}'") from None
    console = _console()
    if not console.is_terminal:  # a log: the demo's own lines only
        raise typer.Exit(demo_lib.run_demo(cfg))
    with _progress(console) as progress:
        task = progress.add_task("demo", total=versions)

        def report(done: int, total: int, stage: str) -> None:
            progress.update(task, completed=done, total=total, description=f"demo: {stage}")

        code = demo_lib.run_demo(cfg, progress=report)
        progress.update(task, description="demo: verified" if code == 0 else "demo: FAILED")
    raise typer.Exit(code)


# --- bench ----------------------------------------------------------------------------------


def bench_module(module: str) -> ModuleType:
    """``weightstream.bench.<module>``, as a wheel or an editable install has it; in a checkout run
    with no install that maps that name (bench/ has no link under weightstream/, as sender/ has:
    mypy would check it), the checkout's ``bench.<module>`` beside weightstream/. Never the benches
    of another tree (an editable install of another checkout maps weightstream.bench there too)."""
    root = Path(__file__).resolve().parents[2]
    try:
        found = importlib.import_module(f"weightstream.bench.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "weightstream.bench":
            raise
    else:
        where = Path(found.__file__ or "").resolve()
        if where.is_relative_to(root / "weightstream" / "bench") or where.is_relative_to(root / "bench"):
            return found
    if not (root / "bench" / "__init__.py").is_file():
        raise ConfigError(
            f"weightstream bench: expected the package weightstream.bench beside weightstream in {root.parent}, "
            "got none; fix: install weightstream from its wheel or sdist (they ship the benches)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    found = importlib.import_module(f"bench.{module}")
    where = Path(found.__file__ or "").resolve()
    if not where.is_relative_to(root / "bench"):
        raise ConfigError(
            f"weightstream bench: expected bench.{module} from {root / 'bench'}, got {where}; fix: rename or "
            "uninstall the other top-level package named bench, or install weightstream"
        )
    return found


def run_bench(name: str, args: list[str]) -> int:
    """``weightstream bench NAME ARGS``: the bench's ``main(ARGS)`` in this process, under a progress
    display on a terminal (the bench's output scrolls above it)."""
    module = bench_module(BENCHES[name][0])
    prog = f"weightstream bench {name}"
    console = _console()
    if not console.is_terminal or {"-h", "--help"} & set(args):
        return int(module.main(args, prog=prog))
    with _progress(console, counted=False) as progress:
        progress.add_task(f"bench {name}", total=None)
        return int(module.main(args, prog=prog))


def _bench_command(name: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        raise typer.Exit(run_bench(name, list(ctx.args)))

    return command


for _name, (_, _summary) in BENCHES.items():
    bench_app.command(
        _name,
        help=_summary,
        # every argument, --help included, goes to the bench's own parser
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(_bench_command(_name))

# Commands in the order `weightstream --help` lists them: demo, status, then the groups.
app.command("status")(status_command)
app.add_typer(bench_app, name="bench")
app.add_typer(snapshot.app, name="snapshot")


# --- entry point ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return its exit code."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="weightstream", standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        _console(stderr=True).print(str(exc.code), markup=False)  # sys.exit("message"), as Python prints it
        return 1
    except WeightstreamError as exc:  # its message names the item, what was expected and the fix
        _console(stderr=True).print(f"error: {type(exc).__name__}: {exc}", style="bold red", markup=False)
        return 2 if isinstance(exc, ConfigError) else 1  # a ConfigError is a bad argument, as click's are
    return 0


if __name__ == "__main__":
    sys.exit(main())
