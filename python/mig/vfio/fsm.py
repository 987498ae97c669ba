"""The VFIO migration uAPI v2 state machine, with no I/O.

States and capability bits are the kernel's (``include/uapi/linux/vfio.h``).
`next_state` is ``vfio_mig_get_next_state()`` of ``drivers/vfio/vfio_main.c``:
the next single arc from the current state toward a target, from the same
next-step table. `arc_effect` says what each single arc does to the
device's data session, so every device implementation walks arcs the same way.
"""

from __future__ import annotations

import enum

from mig.vfio.errors import InvalidTransition

__all__ = [
    "ACTIVE_STATES",
    "PRECOPY_STATES",
    "SAVING_STATES",
    "ArcEffect",
    "MigCap",
    "MigState",
    "arc_effect",
    "next_state",
    "path",
    "state_by_name",
    "supported",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state``, with the kernel's numeric values."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigCap(enum.IntFlag):
    """Migration capabilities: ``VFIO_MIGRATION_*`` flags plus DATA_SIZE.

    STOP_COPY, P2P and PRE_COPY are the kernel's ``VFIO_MIGRATION_*`` bits.
    DATA_SIZE marks support of the separate ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``
    feature; it takes the next free bit here.
    """

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2
    DATA_SIZE = 1 << 3


_S = MigState
# The saving group: a saving data session is open in these states.
SAVING_STATES = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY})
PRECOPY_STATES = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P})
# States in which a device initiates DMA and its internal state changes.
ACTIVE_STATES = frozenset({_S.RUNNING, _S.PRE_COPY})

# vfio_from_fsm_table[cur][target]: next single step from cur toward target.
_COLUMNS = (_S.STOP, _S.RUNNING, _S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY, _S.RESUMING,
            _S.RUNNING_P2P)  # fmt: skip
_BLOCKED = _S.ERROR
_NEXT_ROWS: dict[MigState, tuple[MigState, ...]] = {
    _S.STOP: (_S.STOP, _S.RUNNING_P2P, _S.RUNNING_P2P, _S.RUNNING_P2P, _S.STOP_COPY,
              _S.RESUMING, _S.RUNNING_P2P),
    _S.RUNNING: (_S.RUNNING_P2P, _S.RUNNING, _S.PRE_COPY, _S.RUNNING_P2P, _S.RUNNING_P2P,
                 _S.RUNNING_P2P, _S.RUNNING_P2P),
    _S.PRE_COPY: (_S.RUNNING, _S.RUNNING, _S.PRE_COPY, _S.PRE_COPY_P2P, _S.PRE_COPY_P2P,
                  _S.RUNNING, _S.RUNNING),
    _S.PRE_COPY_P2P: (_S.RUNNING_P2P, _S.RUNNING_P2P, _S.PRE_COPY, _S.PRE_COPY_P2P,
                      _S.STOP_COPY, _S.RUNNING_P2P, _S.RUNNING_P2P),
    _S.STOP_COPY: (_S.STOP, _S.STOP, _BLOCKED, _BLOCKED, _S.STOP_COPY, _S.STOP, _S.STOP),
    _S.RESUMING: (_S.STOP, _S.STOP, _S.STOP, _S.STOP, _S.STOP, _S.RESUMING, _S.STOP),
    _S.RUNNING_P2P: (_S.STOP, _S.RUNNING, _S.RUNNING, _S.PRE_COPY_P2P, _S.STOP, _S.STOP,
                     _S.RUNNING_P2P),
}  # fmt: skip
_NEXT: dict[tuple[MigState, MigState], MigState] = {
    (cur, tgt): row[i] for cur, row in _NEXT_ROWS.items() for i, tgt in enumerate(_COLUMNS)
}
# state_flags_table: the capabilities a state needs. ERROR is never a
# supported state: it cannot be requested, and a device in it needs a reset.
_STATE_NEEDS: dict[MigState, MigCap] = {
    _S.STOP: MigCap.STOP_COPY,
    _S.RUNNING: MigCap.STOP_COPY,
    _S.PRE_COPY: MigCap.STOP_COPY | MigCap.PRE_COPY,
    _S.PRE_COPY_P2P: MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY,
    _S.STOP_COPY: MigCap.STOP_COPY,
    _S.RESUMING: MigCap.STOP_COPY,
    _S.RUNNING_P2P: MigCap.STOP_COPY | MigCap.P2P,
}


def supported(state: MigState, caps: int) -> bool:
    """True when a device with ``caps`` can be put in ``state``."""
    need = _STATE_NEEDS.get(state)
    return need is not None and (need & caps) == need


def next_state(cur: MigState, target: MigState, caps: int) -> MigState:
    """``vfio_mig_get_next_state()``: the next single arc from ``cur`` to ``target``.

    Unsupported optional states on the way are skipped by re-applying the
    table. Raises `InvalidTransition` where the kernel returns ``-EINVAL``.
    The skip loop stops at ERROR (blocked arcs such as STOP_COPY -> PRE_COPY),
    which the kernel fixed after it looped forever there.
    """
    cur, target = MigState(cur), MigState(target)
    if not supported(cur, caps):
        raise InvalidTransition(cur, target, f"the device is in {cur.name}; it needs a reset")
    if not supported(target, caps):
        why = (
            "ERROR cannot be requested"
            if target is _S.ERROR
            else f"{target.name} needs capabilities {_STATE_NEEDS[target]!r}"
        )
        raise InvalidTransition(cur, target, why)
    nxt = _NEXT[cur, target]
    while nxt is not _BLOCKED and not supported(nxt, caps):
        nxt = _NEXT[nxt, target]
    if nxt is _BLOCKED:
        raise InvalidTransition(cur, target, "the kernel blocks this arc")
    return nxt


def path(cur: MigState, target: MigState, caps: int) -> list[MigState]:
    """Every state the device passes through after ``cur`` until ``target``.

    Empty when ``cur`` is ``target``. Raises `InvalidTransition` before any
    arc when the request is refused, as ``SET`` does: nothing moves.
    """
    steps: list[MigState] = []
    at = MigState(cur)
    while at is not target:
        at = next_state(at, target, caps)
        steps.append(at)
    return steps


class ArcEffect(enum.Enum):
    """What one single arc does to the device's data session (its ``data_fd``)."""

    NONE = "none"
    OPEN_PRECOPY = "open-precopy"  # a saving session opens in a PRE_COPY state
    OPEN_STOP_COPY = "open-stop-copy"  # a saving session opens straight in STOP_COPY
    ENTER_STOP_COPY = "enter-stop-copy"  # the open precopy session turns into STOP_COPY
    CLOSE_SAVE = "close-save"  # leaving the saving group ends the session
    OPEN_RESUME = "open-resume"  # a resuming session opens
    FINISH_RESUME = "finish-resume"  # RESUMING -> STOP: the device validates what it got


def arc_effect(cur: MigState, nxt: MigState) -> ArcEffect:
    """The session effect of the single arc ``cur -> nxt``."""
    if cur is _S.RESUMING:
        return ArcEffect.FINISH_RESUME if nxt is _S.STOP else ArcEffect.NONE
    if nxt is _S.RESUMING:
        return ArcEffect.OPEN_RESUME
    was, now = cur in SAVING_STATES, nxt in SAVING_STATES
    if now and not was:
        return ArcEffect.OPEN_PRECOPY if nxt in PRECOPY_STATES else ArcEffect.OPEN_STOP_COPY
    if was and not now:
        return ArcEffect.CLOSE_SAVE
    if was and nxt is _S.STOP_COPY and cur is not _S.STOP_COPY:
        return ArcEffect.ENTER_STOP_COPY
    return ArcEffect.NONE


def state_by_name(name: str) -> MigState:
    """A state from its name, any case, ``-`` or ``_`` (``"stop-copy"``)."""
    try:
        return MigState[name.strip().upper().replace("-", "_")]
    except KeyError:
        raise ValueError(
            f"unknown device state {name!r}; expected one of "
            + ", ".join(s.name.lower() for s in MigState)
        ) from None
