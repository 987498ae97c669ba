"""mig: pre-copy live migration of memory and device state.

The Rust core (``mig._mig``) owns the hot loops; this package orchestrates.
"""

from mig._mig import (
    DirtyBitmap,
    GuestMemory,
    Listener,
    MigError,
    ProtocolError,
    Receiver,
    Sender,
    UnsupportedError,
)

__all__ = [
    "DirtyBitmap",
    "GuestMemory",
    "Listener",
    "MigError",
    "ProtocolError",
    "Receiver",
    "Sender",
    "UnsupportedError",
]
