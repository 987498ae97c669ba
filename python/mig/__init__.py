"""mig: pre-copy live migration of memory and device state.

The Rust core (``mig._mig``) owns the hot loops; this package orchestrates.
"""

from mig._mig import (
    ChunkDigest,
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
    digest_frozen,
    fastest_backing,
    memory_backings,
)
from mig.destination import MigrationDestination
from mig.handlers import LoadHandler, OverBudget, RamHandler, SaveHandler, StateHandler
from mig.memory import Guest
from mig.policies import POLICIES, make_policy
from mig.source import MigrationSource

__all__ = [
    "ChunkDigest",
    "DirtyBitmap",
    "DirtyTracker",
    "Guest",
    "GuestMemory",
    "Listener",
    "LoadHandler",
    "MigError",
    "MigrationDestination",
    "MigrationSource",
    "OverBudget",
    "POLICIES",
    "PostcopyRegion",
    "ProtocolError",
    "RamHandler",
    "Receiver",
    "SaveHandler",
    "Sender",
    "StateHandler",
    "UnsupportedError",
    "WorkloadGuest",
    "capabilities",
    "digest_frozen",
    "fastest_backing",
    "make_policy",
    "memory_backings",
]
