"""A rank's version record: what it serves, what failed, whether the model is whole.

The one place these facts change, under one lock, from the daemon's loop (live versions),
its apply thread (commit hooks, restore) and the caller's thread (waits, status). A
live version moves ``idle -> receiving -> prepared -> idle`` (``aborted`` once bytes of a
version that was not committed reached the model); ``restore`` moves it through
``begin_local`` / ``commit_local`` / ``fail_local``; ``stopped`` is final.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from ..deadline import Deadline, wait_until
from ..protocol.errors import PeerTimeout, WeightstreamError
from ..versions import check_version_order, compare_versions

# the sender's answers to a claim it refused (another connection holds the rank, or the key may not claim it)
CLAIM_ERRORS = ("RankInUse:", "IdentityRefused:")
_FAILED_KEPT = 64  # failed versions remembered for wait_for_version
VERSIONS_KEPT = 16  # ended versions a status shows, with their timings


@dataclass(frozen=True)
class DaemonStatus:
    """A snapshot of a daemon: what it serves and whether the model is whole."""

    state: str  # "idle" | "receiving" | "prepared" | "aborted" | "stopped"
    committed_version: str | None
    receiving_version: str | None  # the version in flight (receiving or prepared)
    model_intact: bool
    last_error: str | None
    connected: bool
    reconnects: int = 0  # times the daemon dropped its connection and opened a new one
    last_reconnect: str | None = None  # why it last did
    heartbeat_misses: int = 0  # times the sender went silent past the heartbeat timeout
    versions: tuple[VersionRecord, ...] = ()  # the last versions that ended here, oldest first


@dataclass(frozen=True)
class VersionRecord:
    """How one version ended on this rank, with its timings.

    ``outcome``: "committed"; "rejected" (the manifest check refused it); "failed" (this rank's
    own error); "aborted" (the sender aborted it, a newer version superseded it, or the connection
    to the sender ended before its commit).
    ``seconds``: BEGIN to the end. ``prepare_seconds``: BEGIN to PREPARED (receiving, verifying,
    applying; None if it never got there). ``change_seconds``: how long the served model was being
    changed, from the first write into it to the commit or the failure (staged: the swap alone;
    None if it was never touched). ``ended``: wall-clock time (``time.time()``) of the end.
    """

    version: str
    outcome: str
    tensors: int
    bytes: int
    seconds: float
    prepare_seconds: float | None
    change_seconds: float | None
    ended: float
    error: str | None = None


@dataclass(frozen=True)
class LocalVersion:
    """A version applied without a sender (restore), between begin_local and its end."""

    version: str
    before: str  # the state it began in: a stopped daemon stays stopped


class RankState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._committed: str | None = None
        self._failed: dict[str, WeightstreamError] = {}
        self._state = "idle"
        self._receiving: str | None = None  # the live version in flight
        self._model_intact = True
        self._last_error: str | None = None
        self._reconnects = 0
        self._last_reconnect: str | None = None
        self._heartbeat_misses = 0
        self._versions: deque[VersionRecord] = deque(maxlen=VERSIONS_KEPT)

    # --- reading -------------------------------------------------------------------------

    @property
    def committed(self) -> str | None:
        with self.cond:
            return self._committed

    @property
    def name(self) -> str:
        with self.cond:
            return self._state

    @property
    def model_intact(self) -> bool:
        with self.cond:
            return self._model_intact

    @property
    def last_error(self) -> str | None:
        with self.cond:
            return self._last_error

    def status(self, connected: bool) -> DaemonStatus:
        with self.cond:
            return DaemonStatus(
                state=self._state,
                committed_version=self._committed,
                receiving_version=self._receiving if self._state in ("receiving", "prepared") else None,
                model_intact=self._model_intact,
                last_error=self._last_error,
                connected=connected,
                reconnects=self._reconnects,
                last_reconnect=self._last_reconnect,
                heartbeat_misses=self._heartbeat_misses,
                versions=tuple(self._versions),
            )

    def failed_already(self, version: str, in_flight: str | None) -> bool:
        """Frames the sender queued before it saw this rank fail ``version``: drop them quietly."""
        with self.cond:
            return version in self._failed and in_flight != version

    def wait_for(self, version: str, timeout: float) -> None:
        """Block until ``version``, or a newer one of its family (``step_3`` for ``step_2``), is
        committed; raise its error if it failed, PeerTimeout on timeout."""
        deadline = Deadline(timeout)

        def committed() -> bool:
            if self._committed == version:
                return True
            if version in self._failed:
                raise self._failed[version]
            # a rank that joined late, or waited late, may never see the version itself: a newer one has it
            if self._committed is not None and compare_versions(self._committed, version) in (0, 1):
                return True
            if self._state == "stopped":
                raise WeightstreamError(f"daemon stopped before version {version!r} was committed")
            return False

        with self.cond:
            if not wait_until(self.cond, committed, deadline):
                raise PeerTimeout(
                    f"version {version!r} was not committed within {timeout}s (committed: {self._committed!r}); "
                    "is the trainer pushing it?"
                )

    # --- errors and the connection --------------------------------------------------------

    def remember_error(self, text: str) -> bool:
        """Record ``text`` as the last error; False if it was already: a refusal comes back at every
        HELLO, and is logged once."""
        with self.cond:
            new, self._last_error = self._last_error != text, text
        return new

    def claim_accepted(self) -> None:
        """A WELCOME came: a claim refused earlier went through after all."""
        with self.cond:
            if self._last_error is not None and self._last_error.startswith(CLAIM_ERRORS):
                self._last_error = None

    def reconnected(self, reason: str) -> None:
        with self.cond:
            self._reconnects += 1
            self._last_reconnect = reason

    def heartbeat_missed(self) -> None:
        with self.cond:
            self._heartbeat_misses += 1

    def record(self, record: VersionRecord) -> None:
        """A version ended: kept (the last ``VERSIONS_KEPT``) for ``status``."""
        with self.cond:
            self._versions.append(record)

    def serving(self) -> None:
        with self.cond:
            self._state = "idle"

    def stopped(self) -> None:
        with self.cond:
            self._state = "stopped"
            self.cond.notify_all()

    # --- a live version ----------------------------------------------------------------

    def retrying(self, version: str) -> None:
        """A BEGIN of ``version``: waiters see this attempt, not the last one."""
        with self.cond:
            self._failed.pop(version, None)

    def receiving(self, version: str) -> None:
        with self.cond:
            self._state = "receiving"
            self._receiving = version

    def prepared(self) -> None:
        with self.cond:
            self._state = "prepared"

    def commit(self, version: str, unfilled: list[str]) -> None:
        with self.cond:
            self._committed = version
            self._receiving = None
            self._state = "idle" if not unfilled else "aborted"
            # a model with tensors still on the meta device cannot run, whatever this version filled
            self._model_intact = not unfilled
            if unfilled:
                self._last_error = (
                    f"WeightstreamError: {len(unfilled)} tensors of the model were not filled by any push and are "
                    f"still on the meta device: {', '.join(unfilled[:5])}; push them too (e.g. named_buffers()), or "
                    "build the model with only its parameters on the meta device"
                )
            self.cond.notify_all()

    def fail(
        self, version: str, error: WeightstreamError, *, touched: bool, shown: str | None = None, unfilled: bool = False
    ) -> None:
        """``version`` failed (rejected, aborted or broken); ``touched``: bytes of it reached the model;
        ``unfilled``: the model still has tensors no version filled, so it cannot run (said in the
        same step, so a waiter woken by the failure sees it)."""
        with self.cond:
            self._failed[version] = error
            if self._receiving == version:
                self._receiving = None
            if len(self._failed) > _FAILED_KEPT:
                self._failed.pop(next(iter(self._failed)))
            self._last_error = shown or f"{type(error).__name__}: {error}"
            if touched:
                self._model_intact = False
                self._state = "aborted"
            elif self._state in ("receiving", "prepared"):
                self._state = "idle" if self._model_intact else "aborted"
            if unfilled:
                self._model_intact = False
            self.cond.notify_all()

    def hook_failed(self, text: str) -> None:
        """A sink hook (after a commit, or an abort) failed: recorded, the version stands."""
        with self.cond:
            self._last_error = text

    # --- a local version (restore) -----------------------------------------------------

    def begin_local(self, version: str, *, rank: int, force: bool) -> LocalVersion:
        """Start applying ``version`` without a sender: refused while a live version is in
        flight, and (unless ``force``) when it is older than the committed one."""
        with self.cond:
            if self._state == "receiving":
                raise WeightstreamError(
                    f"restore: expected an idle daemon, got one receiving a version (rank {rank}); "
                    "fix: wait_for_version() first, or restore before start()"
                )
            check_version_order(version, self._committed, force=force, fix="restore with force=True")
            local = LocalVersion(version, self._state)
            if local.before != "stopped":
                self._state = "receiving"  # a live version that waits for COMMIT keeps its name
            return local

    def commit_local(self, local: LocalVersion) -> None:
        """The whole version is in the model: it is what this rank serves now."""
        with self.cond:
            self._committed = local.version
            self._model_intact = True
            if local.before != "stopped" and self._receiving is None:  # no live version began meanwhile
                self._state = "idle"
            self.cond.notify_all()

    def fail_local(self, local: LocalVersion, exc: BaseException, *, touched: bool) -> None:
        with self.cond:
            self._last_error = f"{type(exc).__name__}: {exc}"
            if touched:
                self._model_intact = False
            if local.before != "stopped":
                self._state = "idle" if self._model_intact else "aborted"
            self.cond.notify_all()
