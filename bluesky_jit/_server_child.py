"""Launcher of the embedded catalog's Tiled server that dies with the process that started it.

:class:`bluesky_jit.catalog.LocalCatalog` runs::

    python -m bluesky_jit._server_child PARENT_PID serve config CONFIG --host H --port P

in a session of its own (so a terminal's Ctrl-C reaches only the parent,
which then stops the server cleanly). A daemon thread polls ``os.getppid()``:
when it no longer is ``PARENT_PID`` (the parent exited, even by SIGKILL, and
this process was re-parented) it sends this process SIGTERM, which the server
answers with a clean shutdown, and exits hard if that has not finished after
a grace period. Then Tiled's own command line runs in this process with the
remaining arguments.

The server keeps off the cores reserved for the RunEngine
(:func:`bluesky_jit.budget.leave_cores_to_the_scan`).

Linux's ``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that
forked exits, and the catalog may be started from a worker thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

POLL_S = 0.2
"""Seconds between two looks at the parent pid."""
GRACE_S = 5.0
"""Seconds the server has to shut down after SIGTERM before this process exits hard."""


def watch_parent(parent_pid: int, *, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Terminate this process once its parent is no longer ``parent_pid``.

    Runs until then (meant for a daemon thread). SIGTERM first, so the server
    shuts down cleanly; ``os._exit`` after ``grace_s`` seconds if it has not.
    """
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(128 + signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the watchdog, then run ``tiled`` with the arguments after the parent pid."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not args[0].isdigit():
        print(
            "usage: python -m bluesky_jit._server_child PARENT_PID TILED_ARGS...; expected the "
            f"parent's pid first, got {args[:1]}. This launcher is started by LocalCatalog.",
            file=sys.stderr,
        )
        return 2
    parent_pid = int(args[0])
    threading.Thread(
        target=watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True
    ).start()
    from .budget import leave_cores_to_the_scan

    leave_cores_to_the_scan()  # the server answers writers; the scan keeps its cores
    from tiled.commandline.main import main as tiled_main

    sys.argv = ["tiled", *args[1:]]
    result = tiled_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
