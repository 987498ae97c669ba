"""``Notifier``: the embedder's callbacks on a migration's progress.

They run on the migration thread; one that raises fails the migration with
its message (except while the migration is already ending).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Notifier"]


@dataclass
class Notifier:
    on_status: Callable[[str], None] | None = None
    on_pass: Callable[[dict[str, Any]], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def status(self, status: str) -> None:
        if self.on_status:
            self.on_status(status)

    def status_while_ending(self, status: str) -> None:
        """A last status: a failing callback changes nothing now."""
        try:
            self.status(status)
        except Exception:
            pass

    def event(self, name: str, **info: Any) -> None:
        if self.on_event:
            self.on_event(name, info)

    def passed(self, record: dict[str, Any]) -> None:
        if self.on_pass:
            self.on_pass(record)


class NotifierCallbacks:
    """The ``on_status``/``on_pass``/``on_event`` attributes of a migration
    front, kept in its ``notify`` (the loop calls them from there)."""

    notify: Notifier

    @property
    def on_status(self) -> Callable[[str], None] | None:
        return self.notify.on_status

    @on_status.setter
    def on_status(self, callback: Callable[[str], None] | None) -> None:
        self.notify.on_status = callback

    @property
    def on_pass(self) -> Callable[[dict[str, Any]], None] | None:
        return self.notify.on_pass

    @on_pass.setter
    def on_pass(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.notify.on_pass = callback

    @property
    def on_event(self) -> Callable[[str, dict[str, Any]], None] | None:
        return self.notify.on_event

    @on_event.setter
    def on_event(self, callback: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.notify.on_event = callback
