"""mig.vfio.fsm arc by arc: every legal single arc, every refused request.

The legal arcs are transcribed from the comment above the kernel's
``vfio_mig_get_next_state()`` (``drivers/vfio/vfio_main.c``), per capability
set, independently of the module's next-step table.
"""

from __future__ import annotations

import itertools

import pytest

from mig.vfio import InvalidTransition
from mig.vfio.fsm import (
    ArcEffect,
    MigCap,
    MigState,
    arc_effect,
    next_state,
    path,
    state_by_name,
)

S = MigState
E = ArcEffect
STOP_COPY, P2P, PRE_COPY = MigCap.STOP_COPY, MigCap.P2P, MigCap.PRE_COPY

# The arcs every device has, with and without P2P, and the PRE_COPY ones.
BASE = {(S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP), (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP)}  # fmt: skip
WITHOUT_P2P = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
WITH_P2P = {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING),
            (S.RUNNING_P2P, S.STOP), (S.STOP, S.RUNNING_P2P)}  # fmt: skip
PRECOPY_WITHOUT_P2P = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING),
                       (S.PRE_COPY, S.STOP_COPY)}  # fmt: skip
PRECOPY_WITH_P2P = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING),
                    (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
                    (S.PRE_COPY_P2P, S.RUNNING_P2P), (S.PRE_COPY_P2P, S.STOP_COPY),
                    (S.RUNNING_P2P, S.PRE_COPY_P2P)}  # fmt: skip

CAPS = {
    "stop-copy": STOP_COPY,
    "p2p": STOP_COPY | P2P,
    "precopy": STOP_COPY | PRE_COPY,
    "p2p+precopy": STOP_COPY | P2P | PRE_COPY,
}

# What each legal arc does to the data session.
EFFECTS = {
    (S.STOP, S.STOP_COPY): E.OPEN_STOP_COPY,
    (S.STOP_COPY, S.STOP): E.CLOSE_SAVE,
    (S.STOP, S.RESUMING): E.OPEN_RESUME,
    (S.RESUMING, S.STOP): E.FINISH_RESUME,
    (S.RUNNING, S.PRE_COPY): E.OPEN_PRECOPY,
    (S.RUNNING_P2P, S.PRE_COPY_P2P): E.OPEN_PRECOPY,
    (S.PRE_COPY, S.RUNNING): E.CLOSE_SAVE,
    (S.PRE_COPY_P2P, S.RUNNING_P2P): E.CLOSE_SAVE,
    (S.PRE_COPY, S.STOP_COPY): E.ENTER_STOP_COPY,
    (S.PRE_COPY_P2P, S.STOP_COPY): E.ENTER_STOP_COPY,
}


def legal_arcs(caps: MigCap) -> set[tuple[MigState, MigState]]:
    arcs = set(BASE)
    if caps & P2P:
        arcs |= WITH_P2P | (PRECOPY_WITH_P2P if caps & PRE_COPY else set())
    else:
        arcs |= WITHOUT_P2P | (PRECOPY_WITHOUT_P2P if caps & PRE_COPY else set())
    return arcs


def states_of(caps: MigCap) -> set[MigState]:
    return {s for arc in legal_arcs(caps) for s in arc}


def every_arc(caps: MigCap) -> list[tuple[MigState, MigState]]:
    return sorted(legal_arcs(caps))


@pytest.mark.parametrize("caps", CAPS.values(), ids=CAPS.keys())
def test_every_legal_arc_is_one_step(caps: MigCap) -> None:
    for cur, nxt in every_arc(caps):
        assert next_state(cur, nxt, caps) is nxt, (cur, nxt)
        assert path(cur, nxt, caps) == [nxt]


@pytest.mark.parametrize("caps", CAPS.values(), ids=CAPS.keys())
def test_every_legal_arc_has_its_session_effect(caps: MigCap) -> None:
    for cur, nxt in every_arc(caps):
        assert arc_effect(cur, nxt) is EFFECTS.get((cur, nxt), E.NONE), (cur, nxt)


def refusal(cur: MigState, target: MigState, caps: MigCap) -> str | None:
    """Why the kernel refuses ``cur -> target`` (-EINVAL), or None."""
    supported = states_of(caps)
    if cur not in supported:
        return "needs a reset"
    if target is S.ERROR:
        return "ERROR cannot be requested"
    if target not in supported:
        return "needs capabilities"
    if cur is S.STOP_COPY and target in (S.PRE_COPY, S.PRE_COPY_P2P):
        return "blocks this arc"
    return None


@pytest.mark.parametrize("caps", CAPS.values(), ids=CAPS.keys())
def test_every_request_steps_along_a_legal_arc_or_is_refused_by_name(caps: MigCap) -> None:
    arcs = legal_arcs(caps)
    refused = 0
    for cur, target in itertools.product(MigState, repeat=2):
        if cur is target:
            # Drivers loop ``while (new_state != cur)``: setting the current
            # state does nothing, even ERROR.
            assert path(cur, target, caps) == []
            continue
        why = refusal(cur, target, caps)
        if why is not None:
            refused += 1
            with pytest.raises(InvalidTransition, match=why) as err:
                next_state(cur, target, caps)
            assert f"from {cur.name} to {target.name}" in str(err.value)
            assert (err.value.cur, err.value.target) == (cur, target)
            with pytest.raises(InvalidTransition):
                path(cur, target, caps)
            continue
        walked = [cur, *path(cur, target, caps)]
        assert walked[-1] is target
        assert len(set(walked)) == len(walked), f"{cur} -> {target} loops: {walked}"
        for arc in itertools.pairwise(walked):
            assert arc in arcs, f"{cur} -> {target} takes {arc}, not a legal arc"
    assert refused > 0


def test_stop_copy_cannot_go_back_to_precopy() -> None:
    caps = STOP_COPY | P2P | PRE_COPY
    for target in (S.PRE_COPY, S.PRE_COPY_P2P):
        with pytest.raises(InvalidTransition, match="the kernel blocks this arc"):
            next_state(S.STOP_COPY, target, caps)


def test_a_saving_state_is_interior_only_between_saving_states() -> None:
    # RUNNING -> STOP must not pass through a PRE_COPY state (it would open a session).
    caps = STOP_COPY | P2P | PRE_COPY
    assert path(S.RUNNING, S.STOP, caps) == [S.RUNNING_P2P, S.STOP]
    assert path(S.PRE_COPY, S.STOP_COPY, caps) == [S.PRE_COPY_P2P, S.STOP_COPY]
    assert path(S.PRE_COPY, S.STOP_COPY, STOP_COPY | PRE_COPY) == [S.STOP_COPY]


def test_state_names() -> None:
    assert state_by_name("stop-copy") is S.STOP_COPY
    assert state_by_name(" Pre_Copy_P2P ") is S.PRE_COPY_P2P
    with pytest.raises(ValueError, match="unknown device state 'sideways'"):
        state_by_name("sideways")
