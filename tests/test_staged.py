"""staged=True: a version torn by its sender never reaches the model in service."""

from __future__ import annotations

import numpy as np
import pytest
from test_malformed import FakeSender, begin, bucket

from weightstream import ReceiverDaemon
from weightstream.protocol import messages as m
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
def test_aborted_half_version_leaves_a_staged_model_intact(endpoint: str, staged: bool) -> None:
    state = {"a.weight": np.zeros(1000, np.float32), "b": np.zeros(3, np.int64)}
    fake = FakeSender(endpoint)
    daemon = ReceiverDaemon(endpoint, NumpySink(state), rank=0, heartbeat_interval=0.1, staged=staged).start()
    try:
        fake.wait_for(m.Hello)
        fake.send(fake.welcome())
        fake.send(begin("v1"))
        fake.wait_for(m.Ready)
        fake.slots[0].host_view()[:4000] = 7
        fake.send(bucket(0, "a.weight"))
        if not staged:
            fake.wait_for(m.Ack)  # the direct path applied bucket 0 to the model
        fake.send(m.Abort(version="v1", reason="trainer crashed"))
        fake.wait_for(m.Failed)
        status = daemon.status
        assert status.model_intact is staged
        assert status.state == ("idle" if staged else "aborted")
        touched = state["a.weight"].view(np.uint8).tolist() == [7] * 4000
        assert touched is (not staged)

        # A full version afterwards commits in both modes, bit-exact.
        fake.send(begin("v2"))
        fake.wait_for(m.Ready)
        b = np.array([4, 5, 6], np.int64)
        fake.slots[0].host_view()[:4000] = 9
        fake.slots[1].host_view()[:24] = b.view(np.uint8)
        fake.send(bucket(0, "a.weight", version="v2"))
        fake.send(bucket(1, "b", version="v2"))
        assert fake.wait_for(m.Prepared).version == "v2"  # two-phase: COMMIT only after PREPARED
        fake.send(m.Commit(version="v2"))
        assert fake.wait_for(m.Committed).version == "v2"
        assert state["b"].tobytes() == b.tobytes()
        assert state["a.weight"].view(np.uint8).tolist() == [9] * 4000
        assert daemon.status.model_intact
    finally:
        daemon.stop()
        fake.close()
