"""mig: pre-copy live migration of memory and device state.

The Rust core (``mig._mig``) owns the hot loops; this package orchestrates.
"""

from mig._mig import (
    DirtyBitmap,
    DirtyTracker,
    GuestMemory,
    MigError,
    ProtocolError,
    UnsupportedError,
    WorkloadGuest,
    capabilities,
)
from mig.memory import Guest

__all__ = [
    "DirtyBitmap",
    "DirtyTracker",
    "Guest",
    "GuestMemory",
    "MigError",
    "ProtocolError",
    "UnsupportedError",
    "WorkloadGuest",
    "capabilities",
]
