"""Completion policies: when to take an exact size, stop the guest, switch over.

A policy sees a read-only ``PolicyView`` and returns a ``Decision``. The loop
asks it once per iteration (``phase == "estimate"``) and again after every
exact measurement it requested (``phase == "exact"``, ``guest_stopped`` tells
whether the guest was paused for it). Policies never touch the guest, memory
or the link, so the same objects run against a simulator in virtual time.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Action",
    "Decision",
    "HandlerView",
    "PolicyView",
    "Policy",
    "POLICIES",
    "DEFAULT_POLICY",
    "make_policy",
    "policy_names",
]


class Action(enum.Enum):
    CONTINUE = "continue"
    EXACT_RUNNING = "exact-running"
    STOP_AND_EXACT = "stop-and-exact"
    COMPLETE = "complete"
    FAIL = "fail"
    # Switch to post-copy (``postcopy`` on): resume on the destination now,
    # the pages still dirty follow on demand (``mig.postcopy_policy``).
    POSTCOPY = "postcopy"


@dataclass(frozen=True)
class Decision:
    action: Action
    # For COMPLETE: a stop-copy byte budget checked while saving (None = none).
    budget: int | None = None
    reason: str = ""


CONTINUE = Decision(Action.CONTINUE)
EXACT_RUNNING = Decision(Action.EXACT_RUNNING)
STOP_AND_EXACT = Decision(Action.STOP_AND_EXACT)
COMPLETE = Decision(Action.COMPLETE)


@dataclass(frozen=True)
class HandlerView:
    name: str
    role: str  # "ram" or "device"
    exact_needs_stop: bool
    estimate: int
    # Exact size measured in this decision round, or None.
    exact: int | None = None
    # The last exact size ever measured and when (clock seconds).
    cached_exact: int | None = None
    cached_at: float | None = None

    @property
    def is_device(self) -> bool:
        return self.role != "ram"


@dataclass(frozen=True)
class PolicyView:
    """What a policy may read. Sizes are bytes, times seconds, rates per second."""

    now: float
    phase: str  # "estimate" or "exact"
    guest_stopped: bool
    handlers: tuple[HandlerView, ...]
    bandwidth: float
    threshold: int
    downtime_limit: float
    dirty_rate: float = 0.0
    since_sync: float = 0.0
    # Measured fixed switchover costs: guest pause, final dirty sync, handshake.
    overhead: float = 0.0
    # What one more pass costs besides its sending until the guest would
    # pause, all of it with the guest running: a dirty sync and the
    # control round trip of the switchover's settle.
    pass_overhead: float = 0.0
    can_switchover: bool = True
    sync_count: int = 0
    passes: int = 0
    guest_stops: int = 0
    guest_stopped_time: float = 0.0
    last_stop_at: float | None = None
    switchover_aborts: int = 0
    ram_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bandwidth_known(self) -> bool:
        return self.bandwidth > 0

    def ram(self) -> HandlerView:
        return next(h for h in self.handlers if not h.is_device)

    def devices(self) -> tuple[HandlerView, ...]:
        return tuple(h for h in self.handlers if h.is_device)

    def estimate(self, devices: bool = True) -> int:
        return sum(h.estimate for h in self.handlers if devices or not h.is_device)

    def measured(self, devices: bool = True) -> int:
        """Exact where measured this round, else the estimate."""
        return sum(
            h.exact if h.exact is not None else h.estimate
            for h in self.handlers
            if devices or not h.is_device
        )


class Policy:
    """Base class: subclasses set ``name`` and implement ``decide``."""

    name = ""
    # OverBudget during completion: True fails the migration, False resumes.
    fail_on_over_budget = False

    def decide(self, view: PolicyView) -> Decision:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}


def _ready(view: PolicyView) -> bool:
    return view.bandwidth_known and view.can_switchover


class EstimateOnly(Policy):
    """Never syncs for an exact size: completes when the estimate fits."""

    name = "estimate-only"

    def decide(self, view: PolicyView) -> Decision:
        if _ready(view) and view.estimate() <= view.threshold:
            return COMPLETE
        return CONTINUE


class ExactRunning(Policy):
    """QEMU 8.0+: below the threshold, take the exact size with the guest running.

    Devices that can size their state only when stopped count at their estimate.
    """

    name = "exact-running"
    count_devices = True

    def decide(self, view: PolicyView) -> Decision:
        if not _ready(view):
            return CONTINUE
        if view.phase == "estimate":
            if view.estimate(self.count_devices) < view.threshold:
                return EXACT_RUNNING
            return CONTINUE
        if view.measured(self.count_devices) <= view.threshold:
            return self.complete(view)
        return CONTINUE

    def complete(self, view: PolicyView) -> Decision:
        return COMPLETE


class StopExactResume(Policy):
    """The RFC 7/7: below the threshold, pause, take every exact size, then
    complete at once (already stopped) or resume and continue."""

    name = "stop-exact-resume"

    def decide(self, view: PolicyView) -> Decision:
        if not _ready(view):
            return CONTINUE
        if view.phase == "estimate":
            return STOP_AND_EXACT if view.estimate() <= view.threshold else CONTINUE
        return COMPLETE if view.measured() <= view.threshold else CONTINUE


class DeviceChecksSla(ExactRunning):
    """``migration_check_pending``: completion carries the budget and every
    handler checks its running total against it as it saves."""

    name = "device-checks-sla"

    def __init__(self, fail_on_over_budget: bool = False) -> None:
        self.fail_on_over_budget = bool(fail_on_over_budget)

    def complete(self, view: PolicyView) -> Decision:
        return Decision(Action.COMPLETE, budget=view.threshold)

    def options(self) -> dict[str, Any]:
        return {"fail_on_over_budget": self.fail_on_over_budget}


class AssumeZeroDevice(ExactRunning):
    """The old v1 behaviour: device state counts as 0 bytes."""

    name = "assume-zero-device"
    count_devices = False


class CachedExact(Policy):
    """Devices keep their last exact size; the guest stops only when a
    stop-only device's cached size is older than ``max_age`` seconds."""

    name = "cached-exact"

    def __init__(self, max_age: float = 2.0) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be > 0")
        self.max_age = float(max_age)

    def _size(self, view: PolicyView) -> int:
        total = 0
        for h in view.handlers:
            if h.exact is not None:
                total += h.exact
            elif h.exact_needs_stop and h.cached_exact is not None:
                total += max(h.cached_exact, h.estimate)
            else:
                total += h.estimate
        return total

    def _stale(self, view: PolicyView) -> bool:
        return any(
            h.exact_needs_stop
            and h.exact is None
            and (h.cached_at is None or view.now - h.cached_at > self.max_age)
            for h in view.handlers
        )

    def decide(self, view: PolicyView) -> Decision:
        if not _ready(view):
            return CONTINUE
        if view.phase == "estimate":
            return EXACT_RUNNING if self._size(view) < view.threshold else CONTINUE
        if not view.guest_stopped and self._stale(view):
            return STOP_AND_EXACT
        return COMPLETE if self._size(view) <= view.threshold else CONTINUE

    def options(self) -> dict[str, Any]:
        return {"max_age": self.max_age}


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


class Adaptive(Policy):
    """mig's own: predict the exact size, stop only when it very likely fits.

    Prediction: RAM's exact = known dirty bytes + dirty rate × time since the
    last sync; a stop-only device's exact = its last exact (or its estimate
    times the learned exact/estimate ratio). The relative error of past
    predictions against measured exact sizes gives a spread, hence a chance
    of fitting. The effective threshold subtracts the measured fixed
    switchover costs (``PolicyView.overhead``: pause, final sync, both sides'
    digests, device production and load, the control round trip) times
    ``fixed_cost_factor`` from the downtime limit. When those fixed costs
    alone, or with the devices' predicted stop-copy state (which sending RAM
    does not shrink), exceed the limit, it falls back to the plain bandwidth
    × limit threshold: switching over as QEMU would beats iterating forever.
    At a stopped exact that fits only that fallback, it resumes while another
    stop is allowed (``max_stops``, the stopped-time budget): a device whose
    state moves with the workload may be smaller at the next stop.

    The limit is a ceiling, not a target: while one more pass would leave
    at most ``shrink`` of RAM's pending bytes (what the guest dirties while
    they are sent, synced and settled) and sending them would take
    more than ``floor`` seconds, it keeps sending with the guest running rather
    than pay them in the downtime. An idle guest thus switches over with
    nothing left to send; a guest whose dirtying keeps up with the link
    switches over as soon as it fits. ``floor`` (1 ms) is small beside the
    fixed costs every switchover pays: the RAM a switchover carries is what
    the guest dirties during one short pass, not a share of the pass before
    it, whose length grows with the guest's memory.

    A cheap running exact (RAM sync) is taken when fitting is at least even.
    The guest stops for an exact measurement only when the chance is at least
    ``p_stop`` (or at least even with RAM down to ``floor`` of sending, so
    that waiting cannot raise the chance) and the stop budget allows (``max_stops``,
    ``min_interval``, ``max_stopped_time``). With the stop budget spent, it completes with a
    byte budget instead, so an over-size device abandons the switchover.
    """

    name = "adaptive"

    def __init__(
        self,
        p_stop: float = 0.8,
        max_stops: int = 3,
        min_interval: float = 1.0,
        max_stopped_time: float | None = None,
        fixed_cost_factor: float = 1.0,
        shrink: float = 0.5,
        floor: float = 0.001,
    ) -> None:
        if not 0 < p_stop <= 1 or max_stops < 0 or min_interval < 0 or fixed_cost_factor < 0:
            raise ValueError(
                "p_stop in (0, 1], max_stops >= 0, min_interval >= 0, fixed_cost_factor >= 0"
            )
        if not 0 <= shrink < 1 or floor < 0:
            raise ValueError("shrink in [0, 1), floor >= 0")
        self.shrink = float(shrink)
        self.floor = float(floor)
        self.fixed_cost_factor = float(fixed_cost_factor)
        self.p_stop = float(p_stop)
        self.max_stops = int(max_stops)
        self.min_interval = float(min_interval)
        self.max_stopped_time = max_stopped_time
        self._errors: list[float] = []
        self._device_ratio: dict[str, float] = {}
        self._last_prediction: dict[str, int] = {}
        # RAM's pending bytes when ``another_pass_pays`` last asked for a pass.
        self._pass_asked_at: int | None = None

    def options(self) -> dict[str, Any]:
        return {
            "p_stop": self.p_stop,
            "max_stops": self.max_stops,
            "min_interval": self.min_interval,
            "max_stopped_time": self.max_stopped_time,
            "fixed_cost_factor": self.fixed_cost_factor,
            "shrink": self.shrink,
            "floor": self.floor,
        }

    def another_pass_pays(self, view: PolicyView) -> bool:
        """One more pass while the guest runs would leave at most ``shrink``
        of RAM's pending bytes, and those take more than ``floor`` to send.
        The guest dirties at the measured rate until it pauses: during the
        pass's sending and ``pass_overhead`` (a sync, the settle's round
        trip). The switchover's fixed costs are paid after the pause, when
        it dirties nothing.

        That is a prediction, so it is checked: when the pass it asked for
        left RAM's pending bytes no smaller, it does not ask again at once.
        A guest that dirties faster than the rate says (bursts, a loaded
        host) would otherwise keep the migration in short passes that each
        leave as much as they sent."""
        if not view.bandwidth_known:
            return False
        pending = self._predict(view, view.ram())
        seconds = pending / view.bandwidth
        dirtied = view.dirty_rate * (seconds + view.pass_overhead)
        pays = seconds > self.floor and dirtied < self.shrink * pending
        if pays and self._pass_asked_at is not None and pending >= self._pass_asked_at:
            pays = False
        self._pass_asked_at = pending if pays else None
        return pays

    def _ram_drained(self, view: PolicyView) -> bool:
        """RAM's pending bytes take at most ``floor`` to send: another pass
        leaves the prediction as it is."""
        return self._predict(view, view.ram()) <= self.floor * view.bandwidth

    def _predict(self, view: PolicyView, h: HandlerView) -> int:
        if h.exact is not None:
            return h.exact
        if not h.is_device:
            grown = h.estimate + view.dirty_rate * view.since_sync
            return int(min(grown, view.ram_total or grown))
        if h.exact_needs_stop and h.cached_exact is not None:
            return max(h.cached_exact, h.estimate)
        return int(h.estimate * self._device_ratio.get(h.name, 1.0))

    def _spread(self) -> float:
        if len(self._errors) < 2:
            return 0.25
        recent = self._errors[-8:]
        return max(0.05, math.sqrt(sum(e * e for e in recent) / len(recent)))

    def _learn(self, view: PolicyView) -> None:
        for h in view.handlers:
            if h.exact is None:
                continue
            predicted = self._last_prediction.pop(h.name, None)
            if predicted is not None and h.exact > 0:
                self._errors.append(predicted / h.exact - 1.0)
            if h.is_device and h.estimate > 0:
                self._device_ratio[h.name] = h.exact / h.estimate

    def _effective_threshold(self, view: PolicyView) -> int:
        budget = view.downtime_limit - self.fixed_cost_factor * view.overhead
        # Sending RAM does not shrink the devices' stop-copy state: with it,
        # the fixed costs may leave no time for any RAM at all.
        devices = sum(self._predict(view, h) for h in view.devices())
        if budget <= 0 or (view.bandwidth > 0 and budget <= devices / view.bandwidth):
            # The fixed costs (and the device state) alone exceed the limit:
            # no wait makes it fit, so switch over as QEMU would rather than
            # iterate forever.
            return int(view.bandwidth * view.downtime_limit)
        return int(view.bandwidth * budget)

    def _fits_plan(self, view: PolicyView) -> bool:
        """The measured state, sent at the measured bandwidth, fits the limit
        less the fixed switchover costs (not the fallback threshold)."""
        budget = view.downtime_limit - self.fixed_cost_factor * view.overhead
        return view.bandwidth > 0 and view.measured() <= view.bandwidth * budget

    def _may_stop_again(self, view: PolicyView) -> bool:
        """Resuming from this stop leaves room for a later one: this stop
        counts once resumed, and the stopped-time budget is not spent."""
        cap = self.max_stopped_time
        if cap is None:
            cap = view.downtime_limit * max(1, self.max_stops)
        return view.guest_stops + 1 < self.max_stops and view.guest_stopped_time < cap

    def _stops_left(self, view: PolicyView) -> bool:
        if view.guest_stops >= self.max_stops:
            return False
        if view.last_stop_at is not None and view.now - view.last_stop_at < self.min_interval:
            return False
        cap = self.max_stopped_time
        if cap is None:
            cap = view.downtime_limit * max(1, self.max_stops)
        return view.guest_stopped_time < cap

    def chance(self, view: PolicyView) -> tuple[int, float]:
        """(predicted total, chance it fits the effective threshold)."""
        predicted = sum(self._predict(view, h) for h in view.handlers)
        spread = self._spread() * max(predicted, 1)
        z = (self._effective_threshold(view) - predicted) / spread
        return predicted, _normal_cdf(z)

    def decide(self, view: PolicyView) -> Decision:
        if not _ready(view):
            return CONTINUE
        if view.phase == "exact":
            self._learn(view)
        threshold = self._effective_threshold(view)
        needs_stop = any(h.exact_needs_stop and h.exact is None for h in view.handlers)
        if view.phase == "exact" and view.guest_stopped:
            if view.measured() > threshold:
                return CONTINUE
            # Within the fallback threshold yet over the plan: a device whose
            # state moves with the workload may be smaller at a later stop,
            # so while another stop is allowed, resume and measure again.
            if not self._fits_plan(view) and self._may_stop_again(view):
                return CONTINUE
            return COMPLETE
        if self.another_pass_pays(view):
            return CONTINUE
        predicted, p = self.chance(view)
        if view.phase == "estimate":
            if p >= 0.5:
                for h in view.handlers:
                    self._last_prediction[h.name] = self._predict(view, h)
                return EXACT_RUNNING
            return CONTINUE
        # Running exact taken: RAM is known, stop-only devices are predicted.
        if not needs_stop:
            if predicted <= threshold:
                return Decision(Action.COMPLETE, budget=threshold)
            return CONTINUE
        if p < self.p_stop and not (p >= 0.5 and self._ram_drained(view)):
            return CONTINUE
        # Likely to fit, or at least even with RAM down to what one more pass
        # cannot shrink (the chance will not rise by waiting): measure or complete.
        if self._stops_left(view):
            for h in view.handlers:
                if h.exact is None:
                    self._last_prediction[h.name] = self._predict(view, h)
            return STOP_AND_EXACT
        return Decision(Action.COMPLETE, budget=threshold)


POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (
        EstimateOnly,
        ExactRunning,
        StopExactResume,
        DeviceChecksSla,
        AssumeZeroDevice,
        CachedExact,
        Adaptive,
    )
}

# Chosen by the policy lab's written rule (docs/lab.md, "The default
# policy"; ``mig.lab.choose_default``): of the policies with at least the SLA
# hit rate of ``stop-exact-resume``, at most a third of its guest stops and
# the best convergence rate, the highest hit rate. tests/test_lab.py applies
# the rule to the quick matrix and fails if it picks another policy.
DEFAULT_POLICY = "adaptive"


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(policy: str | Policy, **options: Any) -> Policy:
    """A policy instance from its name (with constructor options) or as given."""
    if isinstance(policy, Policy):
        if options:
            raise ValueError("policy options apply only when the policy is given by name")
        return policy
    cls = POLICIES.get(policy)
    if cls is None:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad options for policy {policy!r}: {e}") from None
