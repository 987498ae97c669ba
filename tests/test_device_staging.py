"""A destination twin's first load decodes into a buffer reserved, and faulted
in, when the twin was built: before any source connects, not page by page
while the source waits for its switchover-ack."""

from __future__ import annotations

import numpy as np
from devicekit import migrate_device

from mig.devices import MigState, create


def test_a_twin_reserves_its_first_load_buffer_and_the_load_uses_it() -> None:
    spec = "nic:state=1MiB,rate=1MiB/s"
    src, dst = create(spec), create(spec, active=False)
    try:
        assert src.storage._staging is None  # a source never loads
        reserved = dst.storage._staging
        assert reserved is not None and reserved.shape == (dst.storage.capacity,)
        assert not reserved.any()

        migrate_device(src, dst)
        assert dst.state is MigState.STOP
        # The loaded state lives in the reserved buffer; the next load gets a new one.
        assert np.shares_memory(dst.storage.state, reserved)
        assert dst.state_digest() == src.state_digest()
        assert dst.storage.load_staging() is not reserved
    finally:
        src.close()
        dst.close()
