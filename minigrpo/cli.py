"""Errors a command-line user can act on: one line and exit status 2, the traceback only with --debug.

    with one_line_errors(args.debug):
        cfg = Config.load(args.config, args.overrides)

Library callers never pass through here: they get the exception itself, traceback and all.
"""

from __future__ import annotations

import contextlib
import sys

from minigrpo.config import ConfigError

# What a user's input can be wrong about before anything heavy runs: a key or value of the config
# (ConfigError), a recipe file or model folder that is not there (FileNotFoundError).
USER_ERRORS = (ConfigError, FileNotFoundError)


@contextlib.contextmanager
def one_line_errors(debug: bool):
    """Inside: a user error ends the program with `error: <message>` on stderr and status 2 (the
    status argparse gives a bad flag); with `debug`, it is raised with its traceback."""
    try:
        yield
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {err} (--debug: the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
