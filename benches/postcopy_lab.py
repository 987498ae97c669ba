"""Post-copy against pre-copy's aids on workloads that do not converge, in virtual time.

Runs ``mig.lab_postcopy``: three workloads that dirty memory faster than a
100 MiB/s link carries it (the issue's ``sequential:wss=256MiB,rate=961000``
on a 1 GiB guest, a hot set and a uniform writer), each under pre-copy with
auto-converge, pre-copy with dirty-limit, post-copy at once and hybrid
(1 and 3 pre-copy passes, then post-copy). Reports total time, downtime,
guest writes completed during the migration on both sides (and per second
of migration), blocktime and fault latency.

Results go to ``benches/results/postcopy_lab-<commit>.json``, stamped with
the commit, the date and the host model the simulation used; a table is
printed. ``--docs`` rewrites the generated part of ``docs/lab.md``'s
post-copy section from the newest stored result (nothing is run).

    python benches/postcopy_lab.py            # simulate, store, print the table
    python benches/postcopy_lab.py --docs     # docs/lab.md from the stored result
    mig bench postcopy-lab [...]              # the same, from an installed mig

Virtual time: the figures are the model's, on this host's model (``mig bench
calibrate``) or the shipped default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path.
from transfer_user_path import commit

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "lab.md"
NAME = "postcopy_lab"


def newest(results: Path) -> Path:
    """The stored result of the newest commit (by the date stamped in it)."""
    found = sorted(results.glob(f"{NAME}-*.json"))
    if not found:
        raise SystemExit(f"no stored {NAME} result in {results}: run the bench first")
    return max(found, key=lambda p: json.loads(p.read_text())["date"])


def write_docs(path: Path, docs: Path) -> None:
    from mig.lab_postcopy import DOCS_BEGIN, DOCS_END, render_section

    text = docs.read_text()
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    source = path.relative_to(HERE.parent).as_posix()
    section = render_section(json.loads(path.read_text()), source)
    docs.write_text(text[:start] + section + text[end:])
    print(f"wrote {docs} from {source}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="result directory")
    ap.add_argument("--docs", action="store_true", help="only regenerate docs/lab.md's section")
    ap.add_argument("--only", action="append", help="one workload (repeatable)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.docs:
        write_docs(newest(out), DOCS)
        return 0
    from mig.lab_postcopy import run, table
    from mig.sim import load_host_model

    host, origin = load_host_model()
    rows = run(host, args.only)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host-model-source": origin.split(" (")[0],
        "host-model": host.__dict__,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(table(rows)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
