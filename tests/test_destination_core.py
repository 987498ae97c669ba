"""The destination's protocol core, without I/O: message in, effects out."""

from __future__ import annotations

import pytest

from mig import ProtocolError
from mig.destination_core import (
    AnswerPass,
    DestinationCore,
    DestinationPhase,
    EnterSwitchover,
    FinishStopCopy,
    Load,
    Resume,
    Send,
    SetStatus,
    SettleChannels,
    StartLoads,
)
from mig.errors import MigrationEnded
from mig.protocol import (
    VERSION,
    Cancel,
    Complete,
    DeviceInfo,
    DeviceInitialDone,
    Failed,
    Go,
    Hello,
    HelloAck,
    Pass,
    Ping,
    Pong,
    Progress,
    Ready,
    Resumed,
    SessionParams,
    Settle,
    Switchover,
    SwitchoverAbort,
    SwitchoverAck,
    VerifyDigest,
    VerifyResult,
)
from mig.reorder import DEFAULT_MAX_QUEUED_BYTES, DeviceRecord, ReorderBuffer

DIGEST = "0123456789abcdef0123456789abcdef"
OTHER = "f" * 32
# The table and commit-point tests below use strict: the digest checked before ready.
PARAMS = SessionParams(300, 0, 2, "none", "strict")


def hello(**kw: object) -> Hello:
    fields = dict(
        migration_id=9,
        page_size=4096,
        ram_size=1 << 20,
        devices=(DeviceInfo(1, "nic0", "device"),),
        params=PARAMS,
    )
    fields.update(kw)
    return Hello(**fields)  # type: ignore[arg-type]


def core(**kw: object) -> DestinationCore:
    return DestinationCore(4096, 1 << 20, {1: "nic0"}, **kw)  # type: ignore[arg-type]


def active(**kw: object) -> DestinationCore:
    c = core(**kw)
    c.on_message(hello(), 0.0)
    return c


def ready(c: DestinationCore, at: float = 1.0) -> None:
    c.on_message(Complete(DIGEST, 1, {}), at)
    c.stop_copy_received()
    c.verify(DIGEST, at + 0.25)


# Each row: the message that arrives in the ACTIVE phase, and what the core answers.
ACTIVE_TABLE = [
    (Pass(1, 0, {1: 0}), [AnswerPass(1, 0)], DestinationPhase.ACTIVE),
    (Settle(1, 2), [SettleChannels(1, 2)], DestinationPhase.ACTIVE),
    (Switchover({}), [SetStatus("device"), EnterSwitchover()], DestinationPhase.SWITCHOVER),
    (SwitchoverAbort({}, {}, "over"), [SetStatus("active")], DestinationPhase.ACTIVE),
    (Complete(DIGEST, 1, {}), [SetStatus("device"), FinishStopCopy()], DestinationPhase.STOP_COPY),
]


def test_an_accepted_hello_starts_the_loads_before_acking() -> None:
    c = core()
    effects = c.on_message(hello(), 0.0)
    assert effects == [StartLoads(), Send(HelloAck()), SetStatus("active")]
    assert c.phase is DestinationPhase.ACTIVE and c.migration_id == 9 and c.channels == 2


def test_a_ping_is_answered_at_once_but_only_after_hello() -> None:
    c = core()
    with pytest.raises(ProtocolError, match="expected hello, got 'ping'"):
        c.on_message(Ping(1), 0.0)
    c.on_message(hello(), 0.0)
    assert c.on_message(Ping(3), 0.1) == [Send(Pong(3))]
    assert c.phase is DestinationPhase.ACTIVE


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"version": VERSION + 1}, f"protocol version {VERSION + 1}"),
        ({"page_size": 8192}, "page size"),
        ({"ram_size": 1}, "RAM size"),
        ({"devices": (DeviceInfo(1, "gpu0", "device"),)}, "devices"),
        ({"devices": ()}, "devices"),
    ],
)
def test_a_mismatched_hello_fails_and_tells_the_source(change: dict, problem: str) -> None:
    with pytest.raises(MigrationEnded, match=problem) as e:
        core().on_message(hello(**change), 0.0)
    assert e.value.status == "failed" and not e.value.by_peer


@pytest.mark.parametrize(("message", "effects", "phase"), ACTIVE_TABLE)
def test_messages_in_the_active_phase(message, effects, phase) -> None:
    c = active()
    assert c.on_message(message, 0.5) == effects
    assert c.phase is phase


@pytest.mark.parametrize(
    ("message", "status"), [(Cancel("stop"), "cancelled"), (Failed("broke"), "failed")]
)
def test_the_source_ending_it_is_by_peer_in_every_phase(message, status) -> None:
    for c in (core(), active()):
        with pytest.raises(MigrationEnded) as e:
            c.on_message(message, 0.0)
        assert e.value.status == status and e.value.by_peer and e.value.reason.startswith("source:")


def test_messages_out_of_phase_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="expected hello"):
        core().on_message(Pass(1, 0), 0.0)
    with pytest.raises(ProtocolError, match="unexpected control message 'go'"):
        active().on_message(Go(), 0.0)
    c = active()
    ready(c)
    with pytest.raises(ProtocolError, match="expected go, got 'pass'"):
        c.on_message(Pass(2, 1), 2.0)


def test_records_load_in_order_only_up_to_the_announced_bound() -> None:
    c = active()
    c.records_arrived([DeviceRecord(1, 1, b"\x00b", False), DeviceRecord(1, 0, b"\x00a", False)])
    assert c.loads() == []  # nothing announced yet
    c.on_message(Pass(1, 0, {1: 0}), 0.1)
    assert c.loads() == [Load(DeviceRecord(1, 0, b"\x00a", False))]
    c.on_message(Pass(2, 1, {1: 1}), 0.2)
    assert [ld.record.seq for ld in c.loads()] == [1]
    with pytest.raises(ProtocolError, match="duplicate"):
        c.records_arrived([DeviceRecord(1, 1, b"\x00b", False)])
    with pytest.raises(ProtocolError, match="unknown device id 5"):
        c.records_arrived([DeviceRecord(5, 0, b"\x00", False)])
    with pytest.raises(ProtocolError, match="unknown device id 5"):
        c.on_message(Pass(3, 1, {5: 0}), 0.3)


def test_a_peer_that_never_fills_the_gap_hits_the_byte_bound() -> None:
    # Hostile: record 0 never comes, so nothing is ever released, while the
    # later records announced as sent pile up; the bound stops them.
    c = active(max_queued_bytes={1: 10_000})
    c.on_message(Pass(1, 0, {1: 1_000}), 0.1)
    for seq in range(1, 10):
        c.records_arrived([DeviceRecord(1, seq, b"\x00" * 1_000, False)])
    assert c.loads() == []
    with pytest.raises(ProtocolError, match="10 records .*11000 bytes.*10000 bytes per device"):
        c.records_arrived([DeviceRecord(1, 10, b"\x00" * 2_000, False)])


def test_a_peer_that_never_announces_hits_the_record_bound() -> None:
    # Hostile: tiny in-sequence records, never covered by a pass: each is held.
    buf = ReorderBuffer([1], max_records=100)
    for seq in range(100):
        buf.add(DeviceRecord(1, seq, b"\x00", False))
    assert list(buf.release()) == []
    with pytest.raises(ProtocolError, match="101 records .*bound of 100 records"):
        buf.add(DeviceRecord(1, 100, b"\x00", False))
    # Released records free their room again.
    buf.announce({1: 49})
    assert [r.seq for r in buf.release()] == list(range(50))
    for seq in range(101, 151):
        buf.add(DeviceRecord(1, seq, b"\x00", False))
    with pytest.raises(ProtocolError, match="bound of 100 records"):
        buf.add(DeviceRecord(1, 151, b"\x00", False))


def test_the_default_byte_bound_applies_to_every_device() -> None:
    buf = ReorderBuffer([1, 2])
    assert buf.max_bytes == {1: DEFAULT_MAX_QUEUED_BYTES, 2: DEFAULT_MAX_QUEUED_BYTES}
    buf.add(DeviceRecord(2, 1, b"\x00" * DEFAULT_MAX_QUEUED_BYTES, False))
    with pytest.raises(ProtocolError, match=f"device 2: .*{DEFAULT_MAX_QUEUED_BYTES} bytes"):
        buf.add(DeviceRecord(2, 2, b"\x00", False))
    buf.add(DeviceRecord(1, 1, b"\x00", False))  # the other device has its own room


def test_switchover_ack_once_every_device_has_its_initial_data() -> None:
    c = active()
    assert c.announcements() == []
    c.initial_loaded(1)
    assert c.announcements() == [Send(DeviceInitialDone("nic0")), Send(SwitchoverAck())]
    assert c.announcements() == []  # once
    assert active(initially_loaded=[1]).announcements() == [
        Send(DeviceInitialDone("nic0")),
        Send(SwitchoverAck()),
    ]


def test_ready_then_go_is_the_commit_point() -> None:
    c = active()
    c.on_message(Complete(DIGEST, 1, {}), 1.0)
    c.stop_copy_received()
    assert c.verify(DIGEST, 1.25) == [Send(Ready(0.25, True))]
    assert c.phase is DestinationPhase.AWAIT_GO and c.verified
    assert c.on_message(Go(), 3.0) == [Resume()]
    effects = c.resumed(3.5)
    assert effects == [SetStatus("completed"), Send(Resumed(0.75, True))]  # not the wait for go
    assert c.phase is DestinationPhase.RESUMED and c.load_seconds == 0.75


def test_a_lost_go_discards_after_go_timeout() -> None:
    c = active(go_timeout=5.0)
    ready(c, at=1.0)
    c.tick(6.0)  # 4.75 s after ready: still waiting
    with pytest.raises(MigrationEnded, match="no go from the source within 5.0 s") as e:
        c.tick(6.25)
    assert e.value.status == "failed" and not e.value.by_peer
    c.discard()
    assert not c.verified


def test_missing_stop_copy_records_and_a_wrong_digest_fail() -> None:
    c = active()
    c.on_message(Complete(DIGEST, 1, {1: 3}), 1.0)
    with pytest.raises(MigrationEnded, match="device 1: stop-copy records missing"):
        c.stop_copy_received()
    c = active()
    c.on_message(Complete(DIGEST, 1, {}), 1.0)
    with pytest.raises(MigrationEnded, match="memory digest 0+ != source"):
        c.verify("0" * 32, 1.1)


def test_timeouts_before_hello_and_while_idle() -> None:
    c = core(hello_timeout=2.0, idle_timeout=3.0)
    c.await_hello(10.0)
    c.tick(11.0)
    with pytest.raises(MigrationEnded, match="no hello"):
        c.tick(12.0)
    c = core(idle_timeout=3.0)
    c.on_message(hello(), 10.0)
    c.activity(12.0)  # data arrived: not idle
    c.tick(14.5)
    with pytest.raises(MigrationEnded, match="no control message or data for 3.0 s"):
        c.tick(15.5)


def test_a_source_silent_for_its_stall_timeout_ends_the_precopy() -> None:
    """hello's stall_timeout: heartbeats keep it alive; silence ends it, well
    before idle_timeout, naming the source and the pass."""
    c = core(idle_timeout=30.0)
    c.source_name = "source 10.0.0.1:5555"
    c.on_message(hello(params=SessionParams(300, 0, 2, "none", "strict", stall_timeout=2.0)), 0.0)
    c.on_message(Pass(4, 3, {}), 1.0)
    assert c.on_message(Progress(123), 2.5) == []  # a heartbeat: activity, nothing else
    c.tick(4.4)
    with pytest.raises(MigrationEnded, match=(
        r"precopy stalled during pass 4: the source 10\.0\.0\.1:5555 sent nothing for 2 s"
    )):  # fmt: skip
        c.tick(4.6)


def test_heartbeats_are_ignored_in_every_phase() -> None:
    c = active()
    ready(c)
    assert c.on_message(Progress(1), 2.0) == []  # waiting for go: not a protocol error
    assert c.phase is DestinationPhase.AWAIT_GO


def _after(mode: str, **kw: object) -> DestinationCore:
    """A core past ``ready`` in ``mode``, its root ``DIGEST`` taken in 4 ms."""
    c = core(**kw)
    c.on_message(hello(params=SessionParams(300, 0, 2, "none", mode)), 0.0)
    c.on_message(Complete(None, 1, {}), 1.0)
    c.stop_copy_received()
    assert c.verify(DIGEST, 1.25, 0.004) == [Send(Ready(0.25, False, 0.004))]
    assert c.phase is DestinationPhase.AWAIT_GO and not c.verified
    return c


def test_after_resume_resumes_unverified_then_compares_the_sources_digest() -> None:
    c = _after("after-resume")
    assert c.on_message(Go(), 2.0) == [Resume()]
    assert c.phase is DestinationPhase.AWAIT_VERIFY
    assert c.resumed(2.5) == [SetStatus("completed"), Send(Resumed(0.75, False))]
    assert c.on_message(VerifyDigest(DIGEST), 3.0) == [Send(VerifyResult(True, ""))]
    assert c.phase is DestinationPhase.RESUMED and c.verified
    assert c.verify_time == pytest.approx(0.5) and c.verify_error is None


def test_after_resume_mismatch_is_reported_not_discarded() -> None:
    c = _after("after-resume")
    c.on_message(Go(), 2.0)
    c.resumed(2.0)
    (effect,) = c.on_message(VerifyDigest(OTHER), 2.5)
    assert isinstance(effect, Send) and isinstance(effect.message, VerifyResult)
    assert not effect.message.ok and OTHER in effect.message.reason
    assert c.phase is DestinationPhase.RESUMED and not c.verified
    assert c.verify_error is not None and "mismatch" in c.verify_error


def test_after_resume_timeout_and_a_source_failure_end_unverified() -> None:
    c = _after("after-resume", verify_timeout=5.0)
    c.on_message(Go(), 2.0)
    c.resumed(2.0)
    c.tick(6.5)
    assert c.phase is DestinationPhase.AWAIT_VERIFY
    c.tick(7.0)  # no exception: the guest runs here, nothing to discard
    assert c.phase is DestinationPhase.RESUMED and not c.verified
    assert "no memory digest from the source within 5.0 s" in (c.verify_error or "")
    c = _after("after-resume")
    c.on_message(Go(), 2.0)
    c.resumed(2.0)
    assert c.on_message(Failed("disk full"), 2.5) == []
    assert c.verify_error == "source: disk full" and not c.verified
    c = _after("after-resume")
    c.on_message(Go(), 2.0)
    with pytest.raises(ProtocolError, match="expected verify"):
        c.on_message(Pass(1, 1, {}), 2.5)


def test_off_resumes_and_never_compares() -> None:
    c = _after("off")
    c.on_message(Go(), 2.0)
    assert c.phase is DestinationPhase.RESUMED
    c.resumed(2.0)
    assert not c.verified and c.verify_time is None and c.memory_digest == DIGEST
    with pytest.raises(ProtocolError, match="unexpected control message 'verify'"):
        c.on_message(VerifyDigest(DIGEST), 2.5)


def test_complete_must_match_the_verify_mode() -> None:
    c = active()  # strict
    with pytest.raises(ProtocolError, match="complete without a digest in verify mode 'strict'"):
        c.on_message(Complete(None, 1, {}), 1.0)
    c = core()
    c.on_message(hello(params=SessionParams(300, 0, 2, "none", "after-resume")), 0.0)
    with pytest.raises(ProtocolError, match="complete with a digest"):
        c.on_message(Complete(DIGEST, 1, {}), 1.0)


def test_a_required_verify_mode_refuses_another() -> None:
    c = core(verify="strict")
    with pytest.raises(MigrationEnded, match="verify mode 'off' != 'strict' required here"):
        c.on_message(hello(params=SessionParams(300, 0, 2, "none", "off")), 0.0)
    c = core(verify="strict")
    c.on_message(hello(), 0.0)
    assert c.verify_mode == "strict" and c.phase is DestinationPhase.ACTIVE
