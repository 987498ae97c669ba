"""The ``mig`` command.

``mig demo`` migrates a built-in guest live between two local processes;
``mig serve`` / ``mig send`` do the same across hosts; ``mig snapshot`` /
``mig restore`` use the ``file:`` transport; ``mig info`` shows what the host
supports. Exit codes: 0 done, 1 migration failed, 2 bad argument, 130
interrupted (Ctrl-C cancels cleanly: the source guest runs again).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mig.cli_options import (
    DEFAULT_SIZE,
    DEMO_TIMEOUT,
    EXIT_USAGE,
    add_bench,
    add_demo,
    add_info,
    add_restore,
    add_send,
    add_serve,
    add_snapshot,
    new_parser,
)
from mig.cli_placement import placement_args
from mig.cli_postcopy import auto_recover, guest_writes, postcopy_params, serve_workload_args
from mig.cli_values import page_size
from mig.units import format_size, parse_size

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# An image's zero pages are left unwritten (holes). In private anonymous
# memory a hole reads as zeros, so the sender's zero-page scan allocates
# nothing (a memfd hole would be allocated by the read). Where the host
# offers transparent huge pages for anonymous memory, the image is mapped in
# them, as QEMU maps guest RAM: a 2 MiB block that holds data is one page
# table entry instead of 512, so the dirty tracker's walk, which visits
# every entry at every sync (the final one inside the downtime), shrinks
# with it. The block's holes are then allocated as zeros. Tracking stays
# per base page: the first write to a write-protected huge page splits it.
IMAGE_BACKINGS = ("anon-thp", "anon")


def image_backing() -> str:
    """The first of ``IMAGE_BACKINGS`` the host offers."""
    import mig

    offered = {o["backing"] for o in mig.memory_backings() if o["available"]}
    return next((b for b in IMAGE_BACKINGS if b in offered), IMAGE_BACKINGS[-1])


SNAPSHOT_TYPE = "mig-snapshot"

log = logging.getLogger("mig.cli")


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"argument {option}: {message}")


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """``mig``'s parser: one builder per command (mig.cli_options defines every option)."""
    parser, commands = new_parser()
    add_demo(commands)
    add_serve(commands)
    add_send(commands)
    add_snapshot(commands)
    add_restore(commands)
    add_info(commands)
    add_bench(commands)
    return parser


# ----------------------------------------------------------------- helpers
def _stdout_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """Migration parameters (QEMU names) from the command line."""
    params: dict[str, Any] = {
        "downtime_limit": max(1, round(args.downtime_limit * 1000)),
        "max_bandwidth": int(args.max_bandwidth),
        "avail_switchover_bandwidth": int(args.avail_switchover_bandwidth),
        "multifd_channels": int(args.channels),
        "compression": args.compress,
        "auto_converge": args.auto_converge or False,
        "dirty_limit": float(args.dirty_limit),
        "timeout": float(args.timeout or 0.0),
        "timeout_action": args.timeout_action or "cancel",
        **postcopy_params(args),
    }
    if args.policy:
        params["policy"] = args.policy
    if args.verify_mode:
        params["verify"] = args.verify_mode
    if getattr(args, "go_timeout", None):
        params["switchover_timeout"] = float(args.go_timeout)
    if getattr(args, "stall_timeout", None):
        params["stall_timeout"] = float(args.stall_timeout)
    from mig.params import MigrationParams

    try:
        MigrationParams.from_dict(params)  # the checks MigrationSource applies
    except ValueError as e:
        raise UsageError("(migration parameters)", str(e)) from None
    return params


def _tls(args: argparse.Namespace) -> dict[str, str]:
    """The TLS options as API keywords: all three or none."""
    given = {k: getattr(args, k) for k in ("tls_cert", "tls_key", "tls_ca")}
    if any(given.values()) and not all(given.values()):
        raise UsageError("--tls-cert", "TLS needs --tls-cert, --tls-key and --tls-ca together")
    return {k: v for k, v in given.items() if v}


class _Guest:
    """The built-in guest: memory, workload vCPUs and sample devices."""

    def __init__(self, args: argparse.Namespace) -> None:
        import mig
        from mig.devices import create_all

        if args.image:
            try:
                self.memory = mig.GuestMemory.from_image(args.image, image_backing())
            except (OSError, ValueError, mig.MigError) as e:
                raise UsageError("--image", str(e)) from None
            if args.size is not None and args.size != self.memory.size:
                raise UsageError(
                    "--size",
                    f"{format_size(args.size)} disagrees with --image "
                    f"({format_size(self.memory.size)})",
                )
        else:
            size = args.size if args.size is not None else parse_size(DEFAULT_SIZE)
            try:
                self.memory = mig.GuestMemory(size)
            except (ValueError, mig.MigError) as e:
                raise UsageError("--size", str(e)) from None
            except (OSError, MemoryError) as e:
                raise UsageError("--size", f"cannot allocate {format_size(size)}: {e}") from None
        self.devices_spec = args.devices
        self.devices = [] if args.devices == "none" else create_all(args.devices, self.memory)
        try:
            self.guest = mig.WorkloadGuest(self.memory, vcpus=args.vcpus, workload=args.workload)
        except ValueError as e:
            self.close_devices()
            raise UsageError("--workload", str(e)) from None

    def writes(self) -> int:
        return int(self.guest.stats()["writes"])

    def close_devices(self) -> None:
        for d in self.devices:
            d.close()

    def close(self) -> None:
        self.guest.close()
        self.close_devices()


class _Interrupt:
    """SIGINT handler: the first Ctrl-C calls ``cancel``, a second one aborts."""

    def __init__(self, cancel: Callable[[str], Any]) -> None:
        self.cancel = cancel
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        log.warning("interrupted: cancelling")
        if self.cancel("interrupted (Ctrl-C)") is False:
            log.warning("too late to cancel: the destination is already resuming")


def _watch(
    migration: Any,
    render: Callable[[dict[str, Any]], Any] | None,
    console: Console,
) -> dict[str, Any]:
    """Start ``migration``, refresh a live view until it ends; returns its final query()."""
    migration.start()

    def running() -> bool:
        try:
            migration.wait(0.1)
        except TimeoutError:
            return True
        return False

    if render is None:
        while running():
            pass
        return migration.wait()
    with Live(render(migration.query()), console=console, refresh_per_second=8) as live:
        while running():
            live.update(render(migration.query()))
        q = migration.wait()
        live.update(render(q))
    return q


def _show_progress(args: argparse.Namespace, console: Console) -> bool:
    return not args.json and console.is_terminal


def _report_resumed(g: _Guest) -> None:
    """After a cancel or failure: show that the source guest runs again."""
    if not g.guest.running:
        log.error("source guest is NOT running after rollback")
        print("mig: source guest is not running after rollback", file=sys.stderr)
        return
    before = g.writes()
    time.sleep(0.2)
    after = g.writes()
    print(
        f"mig: source guest resumed: running, {after - before} page writes in 200 ms",
        file=sys.stderr,
    )


def _run_source(
    args: argparse.Namespace, g: _Guest, uri: str, console: Console
) -> tuple[dict[str, Any], bool]:
    """Migrate ``g`` to ``uri``; returns the final query() and whether Ctrl-C cancelled it."""
    from mig.source import MigrationSource

    try:
        src = MigrationSource(
            g.guest,
            g.devices,
            uri=uri,
            on_status=lambda status: log.info("migration to %s: %s", uri, status),
            **_tls(args),
            **_params(args),
        )
    except ValueError as e:
        raise UsageError("(migration parameters)", str(e)) from None
    auto_recover(args, src)
    render = (lambda q: _progress(q, uri)) if _show_progress(args, console) else None
    before = g.writes()
    with _Interrupt(src.cancel) as intr:
        q = _watch(src, render, console)
    q = {**q, "guest": guest_writes(g.writes() - before, q)}
    if q.get("postmigrate"):
        print("mig: source guest left paused: the destination may run it", file=sys.stderr)
    elif q.get("status") != "completed":
        _report_resumed(g)
    return q, intr.hit and q.get("status") == "cancelled"


def _progress(q: dict[str, Any], uri: str) -> Any:
    from mig.display import progress_view

    return progress_view(q, title=f"mig → {uri}")


def _finish_source(
    args: argparse.Namespace,
    q: dict[str, Any],
    interrupted: bool,
    console: Console,
    problems: Sequence[str] = (),
) -> int:
    """Print the result (summary or JSON) and choose the exit code."""
    from mig.display import summary_table

    status = q.get("status")
    problems = list(problems)
    if status == "completed" and q.get("verify-error"):
        problems.append(q["verify-error"])  # after-resume: the guest already runs there
    elif status == "completed" and q.get("verify") != "off" and not q.get("verified"):
        problems.append("the destination did not verify the memory digest")
    if args.json:
        _stdout_json(q)
    else:
        title = "simulated migration summary" if q.get("simulated") else "migration summary"
        Console().print(summary_table(q, title=title))
    if interrupted:
        return EXIT_INTERRUPTED
    if status != "completed":
        print(f"mig: migration {status}: {q.get('error-desc', 'no reason given')}", file=sys.stderr)
        return EXIT_FAILED
    if problems:
        for p in problems:
            print(f"mig: verification failed: {p}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _failed(reason: str) -> dict[str, Any]:
    return {"status": "failed", "error-desc": reason}


# ---------------------------------------------------------------- commands
def _refuse_seed(args: argparse.Namespace) -> None:
    """``--seed`` picks a simulated run; a real run has none to pick."""
    if args.seed is not None:
        raise UsageError("--seed", "applies only with --simulate (a real run has no seed)")


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    """``--simulate``: the same options, run in virtual time; the same summary or JSON."""
    from pathlib import Path

    from mig.predict import predict, sim_config

    if args.image:
        raise UsageError("--image", "--simulate models a built-in guest: give --size instead")
    size = args.size if args.size is not None else parse_size(DEFAULT_SIZE)
    try:
        config, origin = sim_config(
            _params(args),
            size=size,
            workload=args.workload,
            vcpus=args.vcpus,
            devices=args.devices,
            host_model=Path(args.host_model) if args.host_model else None,
            demo=args.command == "demo",
            seed=1 if args.seed is None else args.seed,
        )
        q = predict(config, origin)
    except ValueError as e:
        raise UsageError("--simulate", str(e)) from None
    print(f"mig: simulated, not run; host model: {origin}", file=sys.stderr)
    if "assumed-link" in q["sim"]:
        print(
            f"mig: no --max-bandwidth: assumed a {format_size(int(q['sim']['assumed-link']))}/s "
            "link",
            file=sys.stderr,
        )
    return _finish_source(args, q, False, console)


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from mig.demo_destination import DemoDestination

    if args.timeout is None:
        # A demo always ends: when the downtime limit cannot be met (the
        # summary says why), it switches over anyway and shows what it cost.
        args.timeout = DEMO_TIMEOUT
        args.timeout_action = args.timeout_action or "force"
    if args.simulate:
        return cmd_simulate(args, console)
    _refuse_seed(args)
    # The destination starts first, so that its start overlaps the image load.
    size = _guest_size(args)
    # The destination runs the demo's workload after resume, places as told.
    extra = serve_workload_args(args) + placement_args(args)
    pre = not args.postcopy  # post-copy discards what a prefault would populate
    dest = (
        DemoDestination(size, args.devices, args.log_level, _tls(args), extra, pre)
        if size
        else None
    )
    g: _Guest | None = None
    try:
        g = _Guest(args)
        if dest is None or dest.size != g.memory.size:  # the image changed meanwhile
            if dest is not None:
                dest.kill()
            dest = DemoDestination(
                g.memory.size, args.devices, args.log_level, _tls(args), extra, pre
            )
        uri = dest.uri()
        if uri is None:
            out, err = dest.reap(5.0)
            reason = f"destination process did not start: {err.strip() or 'no output'}"
            return _finish_source(args, _failed(reason), False, console)
        q, interrupted = _run_source(args, g, uri, console)
        out, err = dest.reap(30.0)
        dest = None
        return _finish_demo(args, g, q, interrupted, _parse_json(out), err, console)
    finally:
        if dest is not None:
            dest.kill() if g is None else dest.reap(5.0)
        if g is not None:
            g.close()


def _guest_size(args: argparse.Namespace) -> int | None:
    """The guest's size before it is built: the image's, or --size; None if unknown."""
    if not args.image:
        return args.size if args.size is not None else parse_size(DEFAULT_SIZE)
    try:
        return os.stat(args.image).st_size or None
    except OSError:
        return None  # _Guest reports it


def _finish_demo(
    args: argparse.Namespace,
    g: _Guest,
    q: dict[str, Any],
    interrupted: bool,
    dest: dict[str, Any],
    dest_err: str,
    console: Console,
) -> int:
    """Cross-check both ends, add what the destination's memory got, and report."""
    if dest_err.strip():
        log.info("destination: %s", dest_err.strip())
    theirs = dest.get("error-desc")
    if q.get("status") != "completed" and theirs and theirs not in q.get("error-desc", ""):
        # The destination may have ended first, and knows why ("no complete
        # migration session within ..."); the source saw only the effect.
        q = {**q, "error-desc": f"{q.get('error-desc', 'no reason given')}; destination: {theirs}"}
    problems = _cross_check(g, q, dest) if args.end_to_end else []
    if q.get("status") == "completed":
        check = ("failed" if problems else "passed") if args.end_to_end else "skipped"
        q = {**q, "end-to-end-check": check}
    mem = {k: dest[k] for k in _DEST_MEMORY if k in dest}
    if mem:
        q = {**q, "destination-memory": mem}
    for key in ("postcopy", "guest"):
        if dest.get(key):
            q = {**q, f"destination-{key}": dest[key]}
    return _finish_source(args, q, interrupted, console, problems)


# What the destination's query() says its memory got (docs/memory.md).
_DEST_MEMORY = ("memory-backing", "memory-page-size", "memory-huge-bytes")


def _parse_json(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _cross_check(g: _Guest, q: dict[str, Any], dest: dict[str, Any]) -> list[str]:
    """Compare the destination's memory and device digests with the source's."""
    if q.get("status") != "completed":
        return []
    if dest.get("status") != "completed":
        return [f"destination status {dest.get('status')!r}: {dest.get('error-desc', '')}"]
    problems = []
    ours = format(g.memory.digest(), "032x")
    if dest.get("memory-digest") != ours:
        problems.append(f"memory digest {dest.get('memory-digest')} != source {ours}")
    theirs = {d["name"]: d.get("state-digest") for d in dest.get("devices", [])}
    for dev in g.devices:
        mine = format(dev.state_digest(), "032x")
        if theirs.get(dev.name) != mine:
            problems.append(f"device {dev.name}: state digest {theirs.get(dev.name)} != {mine}")
    return problems


def cmd_send(args: argparse.Namespace, console: Console) -> int:
    if args.simulate:
        return cmd_simulate(args, console)
    _refuse_seed(args)
    if args.qmp:
        from mig.cli_qmp import send_qmp

        return send_qmp(args, console)
    if not args.connect:
        raise UsageError("--connect", "give the destination's URI (or --qmp)")
    g = _Guest(args)
    try:
        q, interrupted = _run_source(args, g, args.connect, console)
        return _finish_source(args, q, interrupted, console)
    finally:
        g.close()


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from mig.display import destination_table

    if args.incoming and not args.qmp:
        raise UsageError("--incoming", "defer waits for QMP's migrate-incoming: give --qmp")
    if bool(args.listen) == bool(args.incoming):
        raise UsageError("--listen", "give --listen URI, or --qmp with --incoming defer")
    if args.qmp:
        from mig.cli_qmp import serve_qmp

        return serve_qmp(args, console)
    uri = args.listen
    ready_fd = args.ready_fd
    while True:
        q, interrupted, uri = _serve_one(args, uri, ready_fd, console)
        ready_fd = None
        if args.json:
            _stdout_json(q)
        else:
            Console().print(destination_table(q))
        if interrupted:
            return EXIT_INTERRUPTED
        ok = q.get("status") == "completed"
        if not ok:
            status, reason = q.get("status"), q.get("error-desc")
            print(f"mig: incoming migration {status}: {reason}", file=sys.stderr)
        if args.once:
            return EXIT_OK if ok else EXIT_FAILED


def _serve_one(
    args: argparse.Namespace, uri: str, ready_fd: int | None, console: Console
) -> tuple[dict[str, Any], bool, str]:
    """Receive one migration on ``uri``: (result, interrupted, the bound uri)."""
    import mig
    from mig.destination import MigrationDestination
    from mig.devices import create_all
    from mig.resumed_workload import ResumedWorkload

    try:
        memory = mig.GuestMemory(args.size, args.backing)
    except (ValueError, mig.MigError) as e:
        raise UsageError("--backing", str(e)) from None
    devices = [] if args.devices == "none" else create_all(args.devices, memory, active=False)
    seen = _ResumeDigests()
    handlers = [seen.handler(d, i) for i, d in enumerate(devices, start=1)]
    there = ResumedWorkload(memory, args.workload, args.vcpus) if args.workload else None
    try:
        try:
            dest = MigrationDestination(
                uri,
                memory,
                handlers,
                accept_timeout=args.timeout or 365 * 86400.0,
                verify=args.verify_mode,
                go_timeout=args.go_timeout,
                vcpus=there.vcpus if there else 0,
                prealloc=args.prealloc,
                postcopy_placement=args.postcopy_placement,
                **_tls(args),
            )
        except (OSError, ValueError, mig.MigError) as e:
            # The placement's error names it (continue on memory that is not shmem).
            arg = "--postcopy-placement" if "postcopy-placement" in str(e) else "--listen"
            raise UsageError(arg, str(e)) from None
        if there is not None:
            dest.on_resume, dest.on_status = there.resume, there.status
        auto_recover(args, dest)
        bound = str(dest.uri)  # keeps a picked port for the next migration
        if dest.prealloc is not None:
            dest.prealloc.wait()  # ready once populated, as QEMU's -mem-prealloc
        if ready_fd is not None:
            os.write(ready_fd, (bound + "\n").encode())
            os.close(ready_fd)
        if not args.json:
            print(f"mig: listening on {bound}", file=sys.stderr)
        render = (lambda q: _dest_line(q, bound)) if _show_progress(args, console) else None
        with _Interrupt(dest.cancel) as intr:
            q = _watch(dest, render, console)
        if there is not None:
            q = {**q, "guest": there.stats()}
        return seen.result(q), intr.hit, bound
    finally:
        if there is not None:
            there.close()
        for d in devices:
            d.close()


def _dest_line(q: dict[str, Any], uri: str) -> Any:
    t = Table.grid(padding=(0, 2))
    t.add_row("incoming on", uri, "status", str(q.get("status")), "passes", str(q.get("passes", 0)))
    return t


class _ResumeDigests:
    """Digests of what the destination loaded, taken just before anything runs on it.

    The memory digest is the one the destination verified before any device
    resumed (a DMA device writes RAM once running); each device's state is
    named just before it resumes, so the caller can compare them with the
    stopped source's. A sample device hands over the digest its stream's
    validation computed over the loaded bytes (``loaded_digest``): hashing the
    whole state again here would sit inside the downtime.
    """

    def __init__(self) -> None:
        self.devices: list[dict[str, Any]] = []

    def handler(self, device: Any, device_id: int) -> Any:
        from mig.device_handler import DeviceHandler
        from mig.sample_devices.stored import StoredDevice

        seen = self

        class Recording(DeviceHandler):
            def load_resume(self) -> None:
                dev = self.device
                digest = dev.loaded_digest() if isinstance(dev, StoredDevice) else None
                seen.devices.append(
                    {
                        "name": dev.name,
                        "type": dev.model,
                        "state-digest": format(
                            dev.state_digest() if digest is None else digest, "032x"
                        ),
                    }
                )
                super().load_resume()

        return Recording(device, device_id=device_id)

    def result(self, q: dict[str, Any]) -> dict[str, Any]:
        """The destination's query() plus the digests (once completed)."""
        out = dict(q)
        if q.get("status") == "completed":
            out["devices"] = self.devices
        return out


def cmd_snapshot(args: argparse.Namespace, console: Console) -> int:
    from mig import snapshot

    g = _Guest(args)
    try:
        time.sleep(args.warmup)
        with _Interrupt(lambda reason: None) as intr:
            result = snapshot.save(g.guest, g.devices, g.devices_spec, args.out, args.channels)
        if not g.guest.running:
            result["status"] = "failed"
            result["error-desc"] = "the guest did not resume after the snapshot"
    finally:
        g.close()
    return _print_file_result(args, result, "snapshot", intr.hit)


def cmd_restore(args: argparse.Namespace, console: Console) -> int:
    from mig import snapshot

    if not os.path.isfile(args.file):
        raise UsageError("FILE", f"no such snapshot file: {args.file!r}")
    result = snapshot.load(args.file)
    return _print_file_result(args, result, "restore", False)


def _print_file_result(
    args: argparse.Namespace, result: dict[str, Any], what: str, interrupted: bool
) -> int:
    from mig.display import destination_table

    if args.json:
        _stdout_json(result)
    else:
        Console().print(destination_table(result, title=what))
    if interrupted:
        return EXIT_INTERRUPTED
    if result.get("status") != "completed":
        print(f"mig: {what} failed: {result.get('error-desc')}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# What the Rust core uses of the CPU, and how it finds out.
_CPU_FEATURES = (
    ("sse2", "xxh3-128 memory digests (vectorised at build time)"),
    ("sse4_2", "CRC32C packet checksums (hardware CRC32, detected at run time)"),
    ("popcnt", "bitmap count and decode (detected at run time)"),
    ("bmi1", "bitmap indices()/runs() branch-light decode (detected at run time)"),
    ("avx512f", "bitmap decode with VPCOMPRESSB (with avx512bw and avx512_vbmi2)"),
    ("avx512bw", "bitmap decode with VPCOMPRESSB (with avx512f and avx512_vbmi2)"),
    ("avx512_vbmi2", "bitmap decode with VPCOMPRESSB (detected at run time)"),
    ("avx512_vpopcntdq", "bitmap counting pass (detected at run time)"),
)


def host_info() -> dict[str, Any]:
    import mig

    caps = dict(mig.capabilities())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "kernel": caps.get("kernel", platform.release()),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "page-size": page_size(),
        "dirty-tracking": {
            k: v
            for k, v in caps.items()
            if isinstance(v, dict) and "available" in v and k != "postcopy"
        },
        "postcopy": caps.get("postcopy"),
        "shmem-thp": caps.get("shmem_thp"),
        "memory-backings": mig.memory_backings(),
        "cpu-features": [
            {"flag": flag, "present": flag in flags, "used-for": use} for flag, use in _CPU_FEATURES
        ],
    }


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    info = host_info()
    if args.json:
        _stdout_json(info)
        return EXIT_OK
    out = Console()
    t = Table(title="host", show_header=False, title_justify="left")
    t.add_column("field", style="dim")
    t.add_column("value")
    for key in ("kernel", "machine", "cpus", "page-size", "shmem-thp"):
        t.add_row(key, str(info[key]))
    out.print(t)
    t = Table(title="dirty tracking", title_justify="left")
    for col in ("backend", "available", "reason"):
        t.add_column(col)
    for name, cap in info["dirty-tracking"].items():
        t.add_row(name, "yes" if cap["available"] else "no", str(cap.get("reason", "")))
    out.print(t)
    t = Table(title="memory backings (fastest to fill first)", title_justify="left")
    for col in ("backing", "available", "page size", "reason"):
        t.add_column(col)
    for offer in info["memory-backings"]:
        t.add_row(
            offer["backing"],
            "yes" if offer["available"] else "no",
            format_size(offer["page-size"]),
            offer["reason"],
        )
    out.print(t)
    pc = info["postcopy"]
    t = Table(title="post-copy (userfaultfd MISSING)", show_header=False, title_justify="left")
    t.add_column("field", style="dim")
    t.add_column("value")
    t.add_row("available", "yes" if pc["available"] else "no")
    t.add_row("reason", str(pc["reason"]))
    t.add_row("kernel faults", str(pc["kernel_faults_note"]))
    minor = pc.get("placement_continue") or {}
    yes = "yes" if minor.get("available") else "no"
    t.add_row("placement continue", f"{yes}: {minor.get('reason')}")
    out.print(t)
    t = Table(title="CPU features used", title_justify="left")
    for col in ("flag", "present", "used for"):
        t.add_column(col)
    for feat in info["cpu-features"]:
        t.add_row(feat["flag"], "yes" if feat["present"] else "no", feat["used-for"])
    out.print(t)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "demo": cmd_demo,
    "serve": cmd_serve,
    "send": cmd_send,
    "snapshot": cmd_snapshot,
    "restore": cmd_restore,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # `mig bench` has its own parser; argparse.REMAINDER would not pass it `--help`.
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        from mig import lab  # noqa: PLC0415 - the simulator and matplotlib load only here

        return lab.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console = Console(stderr=True)
    try:
        return COMMANDS[args.command](args, console)
    except UsageError as e:
        print(f"mig: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        log.debug("failure", exc_info=True)
        reason = f"{type(e).__name__}: {e}"
        if getattr(args, "json", False):
            _stdout_json(_failed(reason))
        print(f"mig: {args.command} failed: {reason}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
