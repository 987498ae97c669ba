"""Splits a QMP input stream into JSON texts, as QEMU's JSON streamer does.

Clients do not end a request with a newline (``qemu.qmp`` writes the bare
object), so requests are found by bracket depth outside strings: a text ends
when its outermost ``{...}`` (or ``[...]``) closes. Input outside any object
is garbage, reported once per line; a text larger than ``limit`` ends the stream.
"""

from __future__ import annotations

import codecs

__all__ = ["JsonStream", "InputTooLarge"]

_WHITESPACE = " \t\r\n"
_OPEN = "{["
_CLOSE = "}]"
_JUNK_SHOWN = 32


class InputTooLarge(Exception):
    """One JSON text grew beyond the limit without ending."""


class JsonStream:
    """``feed(bytes)`` returns the JSON texts completed so far and any garbage
    (as ``ValueError``), in input order; raises ``InputTooLarge``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf: list[str] = []
        self._size = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._junk = False

    def feed(self, data: bytes) -> list[str | ValueError]:
        out: list[str | ValueError] = []
        for c in self._decoder.decode(data):
            if self._junk:
                if c == "\n" or c in _OPEN:
                    out.append(self._end_junk())
                else:
                    self._keep(c)
                    continue
            if self._depth == 0:
                if c in _WHITESPACE:
                    continue
                self._buf, self._size = [], 0
                if c in _OPEN:
                    self._depth = 1
                else:
                    self._junk = True
                self._keep(c)
                continue
            self._keep(c)
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    out.append("".join(self._buf))
                    self._buf, self._size = [], 0
        return out

    def _keep(self, c: str) -> None:
        self._size += 1
        if self._size > self.limit:
            raise InputTooLarge(f"QMP input too large: one request over {self.limit} characters")
        if not self._junk or len(self._buf) < _JUNK_SHOWN:
            self._buf.append(c)

    def _end_junk(self) -> ValueError:
        text = "".join(self._buf)
        self._junk = False
        self._buf, self._size = [], 0
        return ValueError(f"JSON parse error, invalid input {text!r}")
