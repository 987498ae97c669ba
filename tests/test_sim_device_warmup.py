"""The simulated devices run from their creation, as the demo's do."""

from __future__ import annotations

from mig.sim import SimConfig, simulate


def test_a_growing_device_grows_through_the_warm_up() -> None:
    # The demo builds its devices before its guest's workload starts; they
    # run while the destination starts, so a growing device's stop-copy
    # state includes what it grew then.
    grow, warmup, state = 2 << 20, 1.0, 4 << 20
    config = SimConfig(
        memory=64 << 20,
        workload="uniform:rate=1000",
        devices=(f"fixed:state={state},grow={grow},max={16 << 20},chunk=4096",),
        prefilled=False,
        warmup=warmup,
    )
    q = simulate(config)
    assert q["status"] == "completed" and q["verified"]
    stop = q["devices"][0]["stop-copy-bytes"]
    # Its state at the stop: what it grew over the warm-up and the migration.
    assert stop >= state + grow * warmup
    assert stop <= state + grow * (warmup + q["total-time"] / 1000) + (64 << 10)
