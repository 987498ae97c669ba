"""The VFIO v2 state machine checked against the kernel's rules, all 8x8 pairs.

The expected behaviour is derived independently of the implementation's
next-step table: the single arcs a driver must implement for each capability
set (the comment above ``vfio_mig_get_next_state()``), then the uAPI's path
rules, searched breadth-first: shortest path; a saving-group state is interior
only on a path that stays in the saving group; STOP_COPY -> PRE_COPY(_P2P)
is blocked; ERROR and unsupported states cannot be requested.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from mig.devices import (
    InvalidTransition,
    MigCap,
    MigState,
    ResumeStream,
    SaveStream,
    TransitionFailed,
    VfioDevice,
)

S = MigState
SAVING = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}

BASE_ARCS = {(S.RESUMING, S.STOP), (S.STOP, S.RESUMING), (S.STOP, S.STOP_COPY),
             (S.STOP_COPY, S.STOP)}  # fmt: skip
P2P_ARCS = {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP),
            (S.STOP, S.RUNNING_P2P)}  # fmt: skip
NO_P2P_ARCS = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
PRECOPY_ARCS = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.STOP_COPY)}
PRECOPY_P2P_ARCS = {
    (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.RUNNING_P2P), (S.PRE_COPY_P2P, S.STOP_COPY), (S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
}  # fmt: skip
CAP_SETS = [
    MigCap.STOP_COPY,
    MigCap.STOP_COPY | MigCap.P2P,
    MigCap.STOP_COPY | MigCap.PRE_COPY,
    MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY,
]


def arcs_for(caps: MigCap) -> set[tuple[MigState, MigState]]:
    arcs = set(BASE_ARCS)
    if caps & MigCap.P2P:
        arcs |= P2P_ARCS
        if caps & MigCap.PRE_COPY:
            arcs |= PRECOPY_P2P_ARCS
    else:
        arcs |= NO_P2P_ARCS
        if caps & MigCap.PRE_COPY:
            arcs |= PRECOPY_ARCS
    return arcs


def supported(state: MigState, caps: MigCap) -> bool:
    if state is S.ERROR:
        return False
    if state is S.RUNNING_P2P:
        return bool(caps & MigCap.P2P)
    if state is S.PRE_COPY:
        return bool(caps & MigCap.PRE_COPY)
    if state is S.PRE_COPY_P2P:
        return bool(caps & MigCap.PRE_COPY and caps & MigCap.P2P)
    return True


def expected_paths(cur: MigState, tgt: MigState, caps: MigCap) -> list[list[MigState]] | None:
    """Every shortest admissible path, or None where the kernel says -EINVAL."""
    if not supported(cur, caps) or not supported(tgt, caps):
        return None
    if cur is S.STOP_COPY and tgt in (S.PRE_COPY, S.PRE_COPY_P2P):
        return None
    if cur is tgt:
        return [[cur]]
    arcs = arcs_for(caps)
    inner_saving_ok = cur in SAVING and tgt in SAVING
    best: list[list[MigState]] = []
    queue = deque([[cur]])
    while queue:
        path = queue.popleft()
        if best and len(path) >= len(best[0]):
            break
        for a, b in arcs:
            if a is not path[-1] or b in path:
                continue
            if b is tgt:
                best.append(path + [b])
            elif b not in SAVING or inner_saving_ok:
                queue.append(path + [b])
    return best or None


def make_device(caps: MigCap) -> VfioDevice:
    return VfioDevice("t", caps, size=10_000, capacity=10_000, chunk=4096)


def saved_stream(caps: MigCap) -> bytes:
    """A valid STOP_COPY stream of a twin device, to load in RESUMING."""
    twin = make_device(caps)
    stream = twin.set_state(S.STOP_COPY)
    assert isinstance(stream, SaveStream)
    out = b""
    while data := stream.read(1 << 16):
        out += data
    return out


def bring_to(dev: VfioDevice, state: MigState) -> None:
    if state is S.ERROR:
        dev.inject_fault(fail=S.STOP, into_error=True)
        with pytest.raises(TransitionFailed):
            dev.set_state(S.STOP_COPY if dev.state is S.STOP else S.STOP)
        assert dev.state is S.ERROR
        dev.arcs.clear()
        return
    opened = dev.set_state(state)
    if state is S.RESUMING:
        assert isinstance(opened, ResumeStream)
        opened.write(saved_stream(dev.caps))
    dev.arcs.clear()


@pytest.mark.parametrize("caps", CAP_SETS, ids=lambda c: str(int(c)))
def test_every_pair_follows_the_kernel_rules(caps: MigCap) -> None:
    checked = 0
    for cur, tgt in itertools.product(MigState, MigState):
        if not supported(cur, caps) and cur is not S.ERROR:
            continue  # a device cannot be in a state it does not support
        dev = make_device(caps)
        bring_to(dev, cur)
        expect = expected_paths(cur, tgt, caps)
        if expect is None or cur is S.ERROR:
            if cur is S.ERROR and tgt is S.ERROR:
                assert dev.set_state(tgt) is None  # no-op, like the drivers' loop
                continue
            with pytest.raises(InvalidTransition, match=f"from {cur.name} to {tgt.name}"):
                dev.set_state(tgt)
            assert dev.state is cur and not dev.arcs
            checked += 1
            continue
        assert len(expect) == 1, f"{cur.name}->{tgt.name}: rules allow {expect}"
        path = expect[0]
        opened = dev.set_state(tgt)
        assert dev.state is tgt
        assert [a for a, _ in dev.arcs] + [tgt] == path if dev.arcs else path == [cur]
        # The final arc opens the data session (data_fd), nothing else does.
        if tgt in SAVING and len(path) > 1 and path[-2] not in SAVING:
            assert isinstance(opened, SaveStream)
        elif tgt is S.RESUMING and cur is not S.RESUMING:
            assert isinstance(opened, ResumeStream)
        else:
            assert opened is None
        checked += 1
    assert checked >= 36


def test_unsupported_and_blocked_arcs_raise_clear_errors() -> None:
    dev = make_device(MigCap.STOP_COPY)
    with pytest.raises(InvalidTransition, match="PRE_COPY needs capabilities"):
        dev.set_state(S.PRE_COPY)
    with pytest.raises(InvalidTransition, match="ERROR cannot be requested"):
        dev.set_state(S.ERROR)
    assert dev.state is S.RUNNING
    full = make_device(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY)
    full.set_state(S.STOP_COPY)
    with pytest.raises(InvalidTransition, match="blocks"):
        full.set_state(S.PRE_COPY)
    no_p2p = make_device(MigCap.STOP_COPY | MigCap.PRE_COPY)
    no_p2p.set_state(S.STOP_COPY)
    # The kernel's skip loop once spun forever here; it must fail cleanly.
    with pytest.raises(InvalidTransition):
        no_p2p.set_state(S.PRE_COPY)
    assert no_p2p.state is S.STOP_COPY


def test_failed_arc_leaves_the_last_reached_state() -> None:
    dev = make_device(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY)
    dev.set_state(S.PRE_COPY)
    dev.inject_fault(fail="stop_copy")
    with pytest.raises(TransitionFailed, match="PRE_COPY_P2P -> STOP_COPY") as err:
        dev.set_state(S.STOP_COPY)
    assert dev.state is S.PRE_COPY_P2P and err.value.state is S.PRE_COPY_P2P
    dev.set_state(S.STOP_COPY)  # the fault fired once
    assert dev.state is S.STOP_COPY


def test_error_needs_a_reset() -> None:
    dev = make_device(MigCap.STOP_COPY | MigCap.P2P)
    bring_to(dev, S.ERROR)
    with pytest.raises(InvalidTransition, match="needs a reset"):
        dev.set_state(S.RUNNING)
    dev.reset()
    assert dev.state is S.RUNNING
