"""The change source: the wire-protocol test primary, alone in its own process.

``changerelay/primary/`` is pure Python and holds one lock per request, so it is the slowest
part of the pipeline; in the harness's process it would also compete with the inserter for the
GIL. Here it runs by itself, prints its connection string on one line and stops when stdin closes.

Run by hand: ``python -m bench.source`` (then point ``MONGO_SRV`` at the printed URI).
"""

from __future__ import annotations

import sys

from changerelay.primary import TestPrimary


def main() -> None:
    primary = TestPrimary().start()
    print(primary.uri, flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    finally:
        primary.stop()


if __name__ == "__main__":
    main()
