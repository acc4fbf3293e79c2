"""The ``distillery`` CLI, killing itself (SIGKILL) at a chosen file write.

``python tests/fault_cli.py <file name> <n> <overrides...>`` runs the CLI with the given
overrides and SIGKILLs the process just before the n-th ``os.replace`` onto a file of that
name: the new version is fully written to its temporary file, the old one not yet replaced.
Every atomic write of the framework goes through ``os.replace``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    name, occurrence = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    real_replace, seen = os.replace, 0

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - os.replace's signature
        nonlocal seen
        if Path(dst).name == name:
            seen += 1
            if seen == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    from distillery.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
