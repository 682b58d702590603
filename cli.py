"""Command-line plumbing shared by train.py, eval.py, bench.py and verifier.py (no torch): an argparse
parser whose --help shows every default and whose errors are one line, flag types that name their allowed
range, and `run`, which turns a user error into one `error: ...` line and Ctrl-C into one line saying what
was kept. Set RLSP_DEBUG=1 to see the traceback instead.
"""
import argparse
import json
import os
import sys

# Errors that a user's input causes (a path, a file's content, a flag, a checkpoint, a missing package, the
# network): one line is the whole story. Anything else is a bug in rlsp and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, ConnectionError, ImportError, FloatingPointError, json.JSONDecodeError)

# What Ctrl-C leaves behind, set by the program once it knows (for example "checkpoints in runs/sft").
interrupt_note = "nothing was kept"


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and "(default: ...)" after every flag that has one."""


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and errors on one line, exit status 2 (no usage block: the
    line names the flag and what it accepts; --help has the rest)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=Formatter, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends where asked), whose error
    says the range, e.g. "must be an integer >= 1 (got '-2')"."""
    name = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
              f"{'<' if high_open else '<='} {high}" if high is not None else ""]
    want = f"{name} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want} (got {text!r})") from None
        if x != x or (low is not None and (x < low or (low_open and x == low))) or \
                (high is not None and (x > high or (high_open and x == high))):
            raise argparse.ArgumentTypeError(f"must be {want} (got {text!r})")
        return x
    parse.__name__ = want  # argparse names the type in some messages
    return parse


positive = number(int, 1)           # counts and sizes
non_negative = number(int, 0)       # counts where 0 means "off" (documented at the flag)
fraction = number(float, 0, 1, low_open=True)  # (0, 1]: top-p


def run(main, argv=None):
    """Call main(argv). A user error prints one `error: ...` line on stderr and exits 1; Ctrl-C prints
    one line with `interrupt_note` and exits 130. RLSP_DEBUG=1 re-raises both with their tracebacks."""
    debug = os.environ.get("RLSP_DEBUG")
    try:
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        line, code = f"interrupted: {interrupt_note}", 130
    except USER_ERRORS as e:
        if debug:
            raise
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""  # torchrun
        line, code = f"error: {rank}{e}", 1
    # Printed after the except block, when the failed frames are gone and any progress bar in them has
    # drawn its last state: the message stays the last line on the terminal.
    print(line, file=sys.stderr)
    sys.exit(code)
