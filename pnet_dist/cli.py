"""Command-line entry points: one clear line for a mistake in the user's input, a traceback only on request.

Every entry point (`python -m pnet_dist.launch`, `python -m pnet_dist.train`, tools/*.py) runs its
main through `run`. The project raises ValueError for bad input -- config, data, paths, options,
credentials -- with a message that names the file, key, value or record and says what to do;
`run` prints that message as one line on stderr and exits with status 2 (as argparse does for a bad
option). So do a missing file (FileNotFoundError) and a refused one (PermissionError). `--debug`
anywhere on the command line, or PNET_LOG_LEVEL=DEBUG, prints the traceback as well. Ctrl-C ends
with status 130 and no traceback. Any other exception is a bug, not the user's input, and keeps
its traceback. The one-line message has the user info of any URI in it redacted (log.redact_uris).

A training run stopped by SIGTERM or a spot notice, after it saved its checkpoint, ends with
status 75 (EXIT_PREEMPTED, sysexits' EX_TEMPFAIL: "try again"), so that `torchrun --max-restarts`
and batch schedulers start it again instead of taking it as done.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from pnet_dist.log import redact_uris

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75   # sysexits EX_TEMPFAIL: stopped by SIGTERM / a spot notice after a checkpoint; run it again
EXIT_INTERRUPTED = 130
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)
DEBUG_HELP = "Add --debug (or set PNET_LOG_LEVEL=DEBUG) to see the traceback of an error."


def one_line(error: BaseException) -> str:
    """The error's message on one line: a multi-line message joined with ' | ', or, when it carries
    a traceback (torch's DataLoader re-raises a loader process's error with it), its last line;
    credentials in a URI are redacted."""
    lines = [line.strip() for line in redact_uris(str(error) or type(error).__name__).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    return " | ".join(lines)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("PNET_LOG_LEVEL", "").upper() == "DEBUG"


def run(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Call main() (which reads sys.argv, with --debug taken out) and turn a user error into one line."""
    prog = prog or os.path.basename(sys.argv[0])
    debug = debug_requested(sys.argv[1:])
    sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--debug"]
    if debug:
        os.environ["PNET_LOG_LEVEL"] = "DEBUG"  # for the processes this one starts
    try:
        return main() or 0
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
