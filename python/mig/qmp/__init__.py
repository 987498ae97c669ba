"""QMP, QEMU's monitor protocol, for mig: the tools that drive QEMU migrations drive mig.

``SourceMonitor`` puts a monitor on a running guest (``migrate``,
``query-migrate``, ``stop``/``cont``, ...); ``DestinationMonitor`` on
incoming migrations (``migrate-incoming``). Both sit on the public
``MigrationSource`` / ``MigrationDestination`` API; ``QMPServer`` is the
protocol alone, for other command sets. See ``docs/qmp.md``.
"""

from mig.qmp.destination_monitor import DestinationMonitor
from mig.qmp.errors import QMPError
from mig.qmp.server import Command, QMPServer
from mig.qmp.settings import CAPABILITIES, MigrationSettings
from mig.qmp.source_monitor import SourceMonitor

__all__ = [
    "CAPABILITIES",
    "Command",
    "DestinationMonitor",
    "MigrationSettings",
    "QMPError",
    "QMPServer",
    "SourceMonitor",
]
