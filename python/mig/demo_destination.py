"""The destination process of ``mig demo``: a ``mig serve --once`` on loopback.

It is started before the source loads its guest, so the destination's
interpreter start and the prefaulting of its memory (``--prealloc``) overlap
the image load instead of adding to the demo's wall time, and the stream
then only copies. Its ready line comes once its memory is populated (as
QEMU's ``-mem-prealloc`` populates before taking an incoming migration);
the source waits for it only when it is about to migrate.

A post-copy demo's destination does not prefault: at the switch it
discards every page it does not hold current (``docs/postcopy.md``), so
the prefault would mostly be freed again.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["DemoDestination"]

READY_TIMEOUT = 60.0
# How long the destination waits for the source to connect. The source loads
# its image after starting the destination, and on a host whose hypervisor
# takes back free memory a large image loads far slower than its disk reads
# (every page faulted back in); the demo kills the destination as soon as
# its source fails, so the bound is only for a demo killed outright.
ACCEPT_TIMEOUT = "600s"


class DemoDestination:
    """A ``mig serve --once`` child listening on a free loopback port."""

    def __init__(
        self,
        size: int,
        devices: str,
        log_level: str,
        tls: dict[str, str],
        extra: Sequence[str] = (),
        prealloc: bool = True,
    ) -> None:
        self.size = size
        r, w = os.pipe()
        cmd = [
            sys.executable, "-m", "mig.cli", "serve", "--listen", "tcp:127.0.0.1:0", "--once",
            "--json", "--size", str(size), "--devices", devices, "--timeout", ACCEPT_TIMEOUT,
            "--ready-fd", str(w), "--log-level", log_level,
            *(["--prealloc"] if prealloc else []), *extra,
        ]  # fmt: skip
        for key, value in tls.items():
            cmd += ["--" + key.replace("_", "-"), value]
        # Its own session: a terminal's Ctrl-C reaches only the source, which
        # cancels and tells the destination over the control channel.
        try:
            self.child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(w,),
                start_new_session=True,
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._ready_fd: int | None = r

    def uri(self) -> str | None:
        """Waits for the ready line; the URI, or None if the child never got ready."""
        r, self._ready_fd = self._ready_fd, None
        if r is None:
            return None
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            uri = os.read(r, 4096).decode().strip() if ready else ""
        finally:
            os.close(r)
        return uri or None

    def reap(self, timeout: float) -> tuple[str, str]:
        """Its stdout and stderr once it exits (killed after ``timeout`` seconds)."""
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
        try:
            out, err = self.child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()
            out, err = self.child.communicate()
        return out.decode(errors="replace"), err.decode(errors="replace")

    def kill(self) -> None:
        """Stops it at once: the demo failed before migrating."""
        self.child.kill()
        self.reap(5.0)
