"""Command-line plumbing shared by the scripts: an argument parser whose errors are one line, and
a runner that turns the errors a user can cause into one line on stderr and a non-zero exit.

Exit status: 0 done, 1 a user error (bad file, bad option value, bad data; the message names
what and says what to do), 2 a bad command line (argparse), 130 interrupted (Ctrl-C / SIGTERM,
after whatever resume needs was saved). Our own bugs still end in a traceback, and ``--debug``
shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from models.convert import CheckpointLayoutError

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .runtime import keep_freed_memory

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Raised by a script after a signal stopped it cleanly (state saved): exit status 130."""


class UserError(Exception):
    """An error the user can fix (bad option combination etc.): one line, exit status 1."""


def user_errors() -> tuple:
    """Exception types whose message is for the user, not a bug report."""
    from .fid import FIDError  # lazy: keeps the Inception code out of the scripts that do not need it
    from .outputs import OutputWriteError
    from .train_utils import NonFiniteLoss
    return (UserError, DataError, ConfigError, CheckpointError, CheckpointLayoutError, FIDError, NonFiniteLoss,
            OutputWriteError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class ParserCaptured(Exception):
    """Raised instead of parsing inside :func:`capture_parser`; carries the script's parser."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


_CAPTURING = [False]


@contextlib.contextmanager
def capture_parser():
    """Within this block, a script's ``parse_args(argv)`` raises :class:`ParserCaptured` with the
    parser it built instead of parsing: how ``pipeline.py`` reads another script's options."""
    _CAPTURING[0] = True
    try:
        yield
    finally:
        _CAPTURING[0] = False


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag and one-line errors (``prog: error: ... (see --help)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show full tracebacks for errors (for bug reports)")

    def parse_args(self, args=None, namespace=None):
        if _CAPTURING[0]:
            raise ParserCaptured(self)
        return super().parse_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(main, argv=None, prog: str | None = None) -> None:
    """Call ``main(argv)``; a user error prints ``<prog>: error: <message>`` on stderr and exits 1,
    an interrupt exits 130; with ``--debug`` user errors raise with their traceback. Every command
    first lets malloc keep freed tensor memory (``utils.runtime.keep_freed_memory``: CPU work
    without page faults on its large tensors)."""
    keep_freed_memory()
    args = sys.argv[1:] if argv is None else argv
    prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "maskgit")
    try:
        main(argv)
    except Interrupted as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except user_errors() as e:
        if "--debug" in args:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
