"""``MigrationParams``: QEMU's migration parameters, validated once, frozen.

``MigrationSource`` and the command line build one with
``MigrationParams.from_dict``; every later reader can trust the values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mig.policies import DEFAULT_POLICY
from mig.protocol import VERIFY_MODES

__all__ = ["PARAMETERS", "POSTCOPY_PUSH_ORDERS", "TIMEOUT_ACTIONS", "MigrationParams"]

# At ``timeout``: give up, switch over whatever the downtime, or (with
# ``postcopy``) switch to post-copy, as virsh's --timeout-postcopy does.
TIMEOUT_ACTIONS = ("cancel", "force", "postcopy")
# postcopy_placement (a destination parameter: MigrationDestination's and
# ``mig serve``'s; QEMU has no such choice): how an arriving page goes into
# guest memory during post-copy. "copy": UFFDIO_COPY, any backing;
# "continue": memfd/shmem only, userfaultfd MINOR mode, the page written
# into the memfd (pwrite) and mapped with UFFDIO_CONTINUE; "auto": the
# faster on shmem by benches/postcopy_placement.py (continue), copy elsewhere.
POSTCOPY_PLACEMENTS = ("auto", "copy", "continue")
# postcopy_push_order: the push follows every request, or one stream at a time.
POSTCOPY_PUSH_ORDERS = ("faults", "stream")


@dataclass(frozen=True)
class MigrationParams:
    downtime_limit: float = 300  # ms
    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    avail_switchover_bandwidth: int = 0  # bytes/s, decisions only, 0 = measured
    multifd_channels: int = 2
    compression: str = "none"
    auto_converge: bool | str = False  # False, True (= "proportional"), "proportional", "qemu"
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99
    dirty_limit: float = 0  # page writes/s per vCPU, 0 = none
    policy: str = DEFAULT_POLICY
    policy_options: dict[str, Any] | None = None
    timeout: float = 0.0  # s, 0 = none
    timeout_action: str = "cancel"  # one of TIMEOUT_ACTIONS
    non_convergence_action: str = "report"  # or "fail"
    tracker_backend: str = "uffd"
    connect_timeout: float = 10.0
    switchover_timeout: float = 30.0  # s to wait for the destination's "resumed"
    io_timeout: float = 60.0  # s a channel may block on a peer that stops reading
    # MSG_ZEROCOPY sends (QEMU's zero-copy-send): tcp:, no compression, no TLS;
    # on loopback the kernel copies anyway, so it cannot pay there.
    zero_copy_send: bool = False
    # When the memory digests are compared: "after-resume" (after the guest
    # runs on the destination: a mismatch is detected, not prevented),
    # "strict" (before resume, a full digest inside the downtime) or "off".
    verify: str = "after-resume"
    verify_timeout: float | None = None  # s for the after-resume answer; None: switchover_timeout
    # Precopy liveness (docs/qmp.md): a precopy whose destination acknowledges
    # no new bytes, or whose data-channel writes stay blocked, for this long
    # fails naming what stalled; the destination ends an incoming migration
    # whose source sends nothing for as long. Well under io_timeout, which
    # only fires once the socket buffers are full and a write times out.
    stall_timeout: float = 10.0
    # QEMU's pause-before-switchover capability: at switchover the guest is
    # paused and the migration waits in status pre-switchover for
    # migrate_continue() (the wait counts as downtime, as in QEMU).
    pause_before_switchover: bool = False
    # Post-copy (QEMU's postcopy-ram capability): the switchover may resume
    # the guest on the destination with pages still owed, fetched on demand.
    # Started by ``start_postcopy()`` or by the policy (``mig.postcopy_policy``):
    # after ``postcopy_after_passes`` whole passes, or once not converging
    # (0: no pass count; the dirty rate is measured early and the switch
    # comes as soon as it reaches the link's bandwidth).
    postcopy: bool = False
    postcopy_after_passes: int = 0
    # bytes/s of the background push during post-copy (QEMU's
    # max-postcopy-bandwidth), within max_bandwidth; 0 = no further limit.
    # Requested pages are paced by max_bandwidth alone.
    max_postcopy_bandwidth: int = 0
    # s a recovery waits for the destination's list of missing pages.
    postcopy_recover_timeout: float = 30.0
    # Which locality the background push follows (mig's own; one of
    # POSTCOPY_PUSH_ORDERS): "stream", one at a time: while a vCPU follows
    # the push, a request elsewhere gets its page alone and the push stays
    # (the default: the guest progresses more for the same total time,
    # docs/postcopy.md); "faults", each request's, as QEMU does.
    postcopy_push_order: str = "stream"

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> MigrationParams:
        """Defaults overridden by ``params``; ``ValueError`` names what is wrong."""
        unknown = set(params) - set(PARAMETERS)
        if unknown:
            raise ValueError(f"unknown migration parameters: {', '.join(sorted(unknown))}")
        p = cls(**params)
        p.check()
        return p

    def check(self) -> None:
        if not 0 < self.downtime_limit <= 2_000_000_000:
            raise ValueError(f"downtime_limit must be in (0, 2e9] ms, not {self.downtime_limit}")
        if not self.io_timeout > 0:
            raise ValueError(f"io_timeout must be > 0, not {self.io_timeout}")
        if not 0 < self.stall_timeout <= 86400:
            raise ValueError(f"stall_timeout must be in (0, 86400] s, not {self.stall_timeout}")
        if not isinstance(self.pause_before_switchover, bool):
            raise ValueError(
                f"pause_before_switchover must be a bool, not {self.pause_before_switchover!r}"
            )
        for key in (
            "max_bandwidth",
            "avail_switchover_bandwidth",
            "dirty_limit",
            "timeout",
            "max_postcopy_bandwidth",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, not {getattr(self, key)}")
        if int(self.multifd_channels) < 1:
            raise ValueError("multifd_channels must be >= 1")
        if self.timeout_action not in TIMEOUT_ACTIONS:
            actions = ", ".join(repr(a) for a in TIMEOUT_ACTIONS)
            raise ValueError(f"timeout_action must be one of {actions}")
        if self.postcopy_push_order not in POSTCOPY_PUSH_ORDERS:
            orders = ", ".join(repr(o) for o in POSTCOPY_PUSH_ORDERS)
            raise ValueError(f"postcopy_push_order must be one of {orders}")
        if self.timeout_action == "postcopy" and not self.postcopy:
            raise ValueError("timeout_action 'postcopy' needs postcopy on")
        if self.non_convergence_action not in ("report", "fail"):
            raise ValueError("non_convergence_action must be 'report' or 'fail'")
        if not isinstance(self.zero_copy_send, bool):
            raise ValueError(f"zero_copy_send must be a bool, not {self.zero_copy_send!r}")
        if self.zero_copy_send and self.compression != "none":
            raise ValueError("zero_copy_send needs compression 'none': compressed pages are copied")
        if self.verify not in VERIFY_MODES:
            modes = ", ".join(repr(m) for m in VERIFY_MODES)
            raise ValueError(f"verify must be one of {modes}, not {self.verify!r}")
        if self.postcopy and self.verify == "strict":
            raise ValueError(
                "postcopy cannot verify strictly: the destination resumes before every"
                " page arrived (use verify 'after-resume' or 'off')"
            )
        if int(self.postcopy_after_passes) < 0:
            raise ValueError("postcopy_after_passes must be >= 0")
        if self.verify_timeout is not None and not self.verify_timeout > 0:
            raise ValueError(f"verify_timeout must be > 0, not {self.verify_timeout}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def verify_wait(self) -> float:
        """Seconds to wait for the after-resume verification's answer."""
        return self.switchover_timeout if self.verify_timeout is None else self.verify_timeout

    @property
    def downtime_limit_s(self) -> float:
        return self.downtime_limit / 1000

    @property
    def switchover_cap(self) -> int:
        """The cap lifted for the stopped phase: ``max_bandwidth`` when
        ``avail_switchover_bandwidth`` says the link carries more, else 0."""
        return int(self.max_bandwidth) if self.avail_switchover_bandwidth else 0


# The defaults, by name: the public table of accepted parameters.
PARAMETERS: dict[str, Any] = {f.name: f.default for f in fields(MigrationParams)}
