"""mig: pre-copy live migration of memory and device state.

The Rust core (``mig._mig``) owns the hot loops; this package orchestrates.
"""

from mig._mig import DirtyBitmap, GuestMemory, MigError, ProtocolError, UnsupportedError

__all__ = [
    "DirtyBitmap",
    "GuestMemory",
    "MigError",
    "ProtocolError",
    "UnsupportedError",
]
