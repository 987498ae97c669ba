"""``QMPError``: a command's failure, sent as QMP's ``{"error": {class, desc}}``."""

from __future__ import annotations

__all__ = ["QMPError"]


class QMPError(Exception):
    """A QMP error reply. ``error_class`` is QEMU's: ``GenericError`` for nearly
    everything, ``CommandNotFound`` for an unknown (or not yet negotiated) command."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
