"""mig: pre-copy live migration of memory and device state.

The Rust core (``mig._mig``) owns the hot loops; this package orchestrates.
"""

from mig._mig import (
    DirtyBitmap,
    DirtyTracker,
    GuestMemory,
    Listener,
    MigError,
    PostcopyRegion,
    ProtocolError,
    Receiver,
    Sender,
    UnsupportedError,
    WorkloadGuest,
    capabilities,
)
from mig.destination import MigrationDestination
from mig.handlers import OverBudget, RamHandler, StateHandler
from mig.memory import Guest
from mig.policies import POLICIES, make_policy
from mig.source import MigrationSource

__all__ = [
    "DirtyBitmap",
    "DirtyTracker",
    "Guest",
    "GuestMemory",
    "Listener",
    "MigError",
    "MigrationDestination",
    "MigrationSource",
    "OverBudget",
    "POLICIES",
    "PostcopyRegion",
    "ProtocolError",
    "RamHandler",
    "Receiver",
    "Sender",
    "StateHandler",
    "UnsupportedError",
    "WorkloadGuest",
    "capabilities",
    "make_policy",
]
