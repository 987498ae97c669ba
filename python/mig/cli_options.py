"""The ``mig`` command line's options: shared option groups and one builder per command.

Every option is defined once, in the function for its group; a command's
builder lists the groups it takes plus its own options. ``mig.cli`` assembles
the parser from these builders and runs the commands. Option names and
defaults are a user interface: change them only on purpose.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mig.cli_placement import add_placement_option
from mig.cli_postcopy import add_postcopy_options, add_serve_workload
from mig.cli_values import (
    MAX_VCPUS,
    device_specs,
    dirty_limit,
    int_range,
    policy_names,
    positive,
    typed,
)
from mig.params import TIMEOUT_ACTIONS
from mig.prealloc import add_prealloc_option
from mig.protocol import VERIFY_MODES
from mig.units import parse_duration, parse_rate, parse_size

EXIT_USAGE = 2
DEFAULT_SIZE = "1GiB"
# A hot set of 10 % of RAM written at a pace a loopback link outruns, so the
# default run converges and shows several passes; raise ``rate`` to see
# auto-converge and the policies work harder.
DEFAULT_WORKLOAD = "hotset:rate=50000"
DEFAULT_DEVICES = "nic"
DEFAULT_VCPUS = 2
DEMO_TIMEOUT = 60.0
COMPRESSIONS = ("none", "zstd", "lz4")
AUTO_CONVERGE_MODES = ("proportional", "qemu")
BACKINGS = ("auto", "memfd", "memfd-thp", "anon", "anon-thp", "hugetlb")
MAX_CHANNELS = 64

# ``add_argument`` target: a parser or one of its argument groups.
Options = argparse.ArgumentParser | argparse._ArgumentGroup
# The subcommand list ``add_subparsers`` returns.
Commands = argparse._SubParsersAction


class OptionParser(argparse.ArgumentParser):
    """One-line errors that name the argument, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"mig: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def new_parser() -> tuple[argparse.ArgumentParser, Commands]:
    """The top-level ``mig`` parser and its (required) subcommand list."""
    parser = OptionParser(
        prog="mig", description="Pre-copy live migration of memory and device state."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OptionParser)
    commands.required = True
    return parser, commands


# -------------------------------------------------------------- commands
def add_demo(commands: Commands) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo",
        help="migrate a running guest live between two local processes",
        description="Start a destination process and migrate a running guest to it over "
        "loopback TCP, with a live progress view.",
    )
    _add_source_options(demo)
    add_placement_option(demo, backings=BACKINGS)
    return demo


def add_serve(commands: Commands) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve",
        help="run the destination",
        description="Receive migrations on URI; the size and devices must match the source's.",
    )
    add_output_options(serve)
    add_devices_option(serve)
    add_tls_options(serve)
    serve.add_argument("--listen", metavar="URI", help="tcp:HOST:PORT or unix:PATH")
    serve.add_argument("--once", action="store_true", help="exit after one migration")
    add_verify(
        serve,
        "accept only sources with this verify mode: after-resume, strict or off "
        "(default: the source's)",
    )
    add_size(serve, DEFAULT_SIZE)
    add_timeout(serve, "wait this long for a source (default: forever)")
    serve.add_argument(
        "--backing",
        choices=BACKINGS,
        default="auto",
        help="destination memory backing (default auto: the fastest to fill the host "
        "offers; `mig info` lists them)",
    )
    # The file descriptor `mig demo` gives its destination to learn the bound port.
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    add_prealloc_option(serve)
    add_placement_option(serve)
    add_serve_workload(serve)
    add_go_timeout(serve, "wait this long for the source's go before discarding (default 30s)")
    add_qmp_options(serve, incoming=True)
    return serve


def add_send(commands: Commands) -> argparse.ArgumentParser:
    send = commands.add_parser(
        "send",
        help="run a guest and migrate it to a destination",
        description="Run the built-in guest and migrate it live to a `mig serve` at URI.",
    )
    _add_source_options(send)
    send.add_argument("--connect", metavar="URI", help="tcp:HOST:PORT or unix:PATH")
    add_go_timeout(
        send, "wait this long for the destination's ready, then its resumed (default 30s)"
    )
    add_qmp_options(send, incoming=False)
    return send


def add_snapshot(commands: Commands) -> argparse.ArgumentParser:
    snap = commands.add_parser(
        "snapshot",
        help="save a running guest to a file",
        description="Run the built-in guest, stop it, save memory and device state to FILE "
        "with the file: transport, and resume it.",
    )
    add_output_options(snap)
    add_guest_options(snap)
    add_devices_option(snap)
    snap.add_argument("--out", required=True, metavar="FILE", help="snapshot file to write")
    snap.add_argument(
        "--warmup",
        type=typed(parse_duration),
        default=0.5,
        metavar="TIME",
        help="let the workload run this long first (default 500ms)",
    )
    add_channels(snap, "parallel writer channels (default 2)")
    return snap


def add_restore(commands: Commands) -> argparse.ArgumentParser:
    restore = commands.add_parser(
        "restore",
        help="load and verify a snapshot",
        description="Load a snapshot written by `mig snapshot` and verify memory and devices.",
    )
    add_output_options(restore)
    restore.add_argument("file", metavar="FILE")
    return restore


def add_info(commands: Commands) -> argparse.ArgumentParser:
    info = commands.add_parser(
        "info",
        help="host capabilities",
        description="Dirty-tracking backends, kernel version and the CPU features mig uses.",
    )
    add_output_options(info)
    return info


def add_bench(commands: Commands) -> argparse.ArgumentParser:
    # Listed for --help only: cli.main() hands `mig bench ...` to mig.lab's own parser.
    return commands.add_parser("bench", help="policy lab and micro-benchmarks (mig bench --help)")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """What every command that runs a guest and migrates it takes (demo, send)."""
    add_output_options(parser)
    add_guest_options(parser)
    add_devices_option(parser)
    add_migration_options(parser)
    add_tls_options(parser)


# --------------------------------------------------------- option groups
def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--json``: what every command prints."""
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error", "critical"),
        help="logging level on stderr (default: warning)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print only the final statistics object as JSON on stdout",
    )


def add_guest_options(parser: argparse.ArgumentParser) -> None:
    """The built-in guest: its memory (size or image) and its vCPU workload."""
    g = parser.add_argument_group("guest")
    # None, not DEFAULT_SIZE: --image gives the size when --size is absent.
    add_size(g, None)
    g.add_argument("--image", metavar="FILE", help="load guest memory from a raw image")
    g.add_argument(
        "--workload",
        metavar="SPEC",
        default=DEFAULT_WORKLOAD,
        help=f"vCPU workload: idle, sequential, uniform, hotset, zipf (default {DEFAULT_WORKLOAD})",
    )
    g.add_argument(
        "--vcpus",
        type=int_range(1, MAX_VCPUS),
        default=DEFAULT_VCPUS,
        help=f"number of vCPUs (default {DEFAULT_VCPUS})",
    )


def add_size(options: Options, default: str | None) -> None:
    options.add_argument(
        "--size",
        type=typed(parse_size, positive),
        default=default,
        help=f"guest memory size (default {DEFAULT_SIZE})",
    )


def add_devices_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devices",
        metavar="SPEC[,SPEC]",
        type=device_specs,
        default=DEFAULT_DEVICES,
        help=f"devices such as nic:state=64MiB,rate=20MiB/s, or none (default {DEFAULT_DEVICES})",
    )


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("mutual TLS on every channel (all three, PEM files)")
    t.add_argument("--tls-cert", metavar="FILE", help="this side's certificate (chain)")
    t.add_argument("--tls-key", metavar="FILE", help="its private key")
    t.add_argument("--tls-ca", metavar="FILE", help="CA that the peer's certificate must chain to")


def add_migration_options(parser: argparse.ArgumentParser) -> None:
    """The ``migration`` group: the parameters, then how the run is bounded and checked."""
    add_postcopy_options(parser)
    m = parser.add_argument_group("migration")
    add_migration_parameters(m)
    add_run_control(m)


def add_migration_parameters(m: Options) -> None:
    """QEMU's migration parameters (``mig.params.MigrationParams``) the command line sets."""
    policies = policy_names()
    m.add_argument(
        "--policy",
        choices=policies,
        default=None,
        help="completion policy" + (f": {', '.join(policies)}" if policies else ""),
    )
    m.add_argument(
        "--downtime-limit",
        type=typed(parse_duration, positive),
        default=0.3,
        metavar="TIME",
        help="downtime limit, e.g. 300ms (default 300ms)",
    )
    m.add_argument(
        "--max-bandwidth",
        type=typed(parse_rate),
        default=0,
        metavar="RATE",
        help="bandwidth cap, e.g. 100MiB/s (default unlimited)",
    )
    m.add_argument(
        "--avail-switchover-bandwidth",
        type=typed(parse_rate),
        default=0,
        metavar="RATE",
        help="bandwidth assumed for the switchover decision (default: measured)",
    )
    add_channels(m, "parallel data channels (default 2)")
    m.add_argument("--compress", choices=COMPRESSIONS, default="none", help="page compression")
    m.add_argument(
        "--auto-converge",
        nargs="?",
        const="proportional",
        default=None,
        choices=AUTO_CONVERGE_MODES,
        metavar="MODE",
        help="throttle vCPUs to converge: proportional (default mode) or qemu",
    )
    m.add_argument(
        "--dirty-limit",
        type=dirty_limit,
        default=0.0,
        metavar="RATE",
        help="per-vCPU cap on page writes/s (a number, or a rate such as 8MiB/s)",
    )


def add_run_control(m: Options) -> None:
    """How long a migration may take, how it is verified, and whether it is only simulated."""
    add_timeout(m, f"give up after this long (default: never; mig demo: {DEMO_TIMEOUT:.0f}s)")
    m.add_argument(
        "--timeout-action",
        choices=TIMEOUT_ACTIONS,
        default=None,
        help="at the timeout, cancel, force the switchover, or switch to post-copy "
        "(with --postcopy; virsh's --timeout-postcopy) "
        "(default cancel; mig demo at its default timeout: force)",
    )
    add_verify(
        m,
        "compare the memory digests after-resume (default: a mismatch is detected once "
        "the guest runs on the destination), strict (before resume, a full digest in the "
        "downtime) or off",
    )
    m.add_argument(
        "--simulate",
        action="store_true",
        help="predict the migration in virtual time instead of running it "
        "(this host's model from `mig bench calibrate`, or the shipped default)",
    )
    m.add_argument(
        "--host-model",
        metavar="FILE",
        default=None,
        help="host model for --simulate (default: $MIG_HOST_MODEL or "
        "~/.config/mig/host-model.json)",
    )
    m.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="with --simulate: the seed of the simulated guest's writes and of the "
        "link's jitter (default 1); each seed is one run a real migration could be",
    )
    m.add_argument(
        "--no-verify",
        dest="end_to_end",
        action="store_false",
        help="skip the demo's own end-to-end digest check (on by default)",
    )
    add_stall_timeout(m)


def add_stall_timeout(group: Options) -> None:
    """``--stall-timeout``: how long a precopy may make no progress (``mig.stall_watch``)."""
    from mig.params import PARAMETERS

    group.add_argument(
        "--stall-timeout",
        type=typed(parse_duration, positive),
        default=None,
        metavar="TIME",
        help="fail a precopy that makes no progress this long: no bytes acknowledged by the "
        "destination, or a destination that stopped reading (default "
        f"{PARAMETERS['stall_timeout']:g}s)",
    )


# ------------------------------------- single options several commands take
# Each takes its help text: the option means the same, but each command says
# what it bounds or selects there.
def add_channels(options: Options, help: str) -> None:
    options.add_argument("--channels", type=int_range(1, MAX_CHANNELS), default=2, help=help)


def add_timeout(options: Options, help: str) -> None:
    options.add_argument(
        "--timeout",
        type=typed(parse_duration, positive),
        default=None,
        metavar="TIME",
        help=help,
    )


def add_verify(options: Options, help: str) -> None:
    """``--verify MODE``: the digest check (docs/protocol.md); serve filters on it."""
    options.add_argument(
        "--verify",
        dest="verify_mode",
        choices=VERIFY_MODES,
        default=None,
        metavar="MODE",
        help=help,
    )


def add_go_timeout(parser: argparse.ArgumentParser, help: str) -> None:
    """``--go-timeout``: each side's wait across the commit point (docs/protocol.md)."""
    parser.add_argument(
        "--go-timeout",
        type=typed(parse_duration, positive),
        default=None,
        metavar="TIME",
        help=help,
    )


def add_qmp_options(parser: argparse.ArgumentParser, incoming: bool) -> None:
    """``--qmp`` (and ``--incoming defer`` on serve): the command driven through QMP."""
    parser.add_argument(
        "--qmp",
        metavar="ADDRESS",
        help="serve QMP on unix:PATH or tcp:HOST:PORT and run until its quit"
        + ("" if incoming else "; migrations start on its migrate"),
    )
    if incoming:
        parser.add_argument(
            "--incoming",
            choices=("defer",),
            help="with --qmp: listen only on migrate-incoming (instead of --listen)",
        )
