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


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and "(default: ...)" once after every flag: its value, unless the
    help says itself what the default is (where it depends on the run or the machine)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:  # positionals
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and errors on one line, exit status 2 (no usage block: the
    line names the flag and what it accepts; --help has the rest)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=Formatter, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def out_of_range(x, kind, low=None, high=None, low_open=False, high_open=False):
    """None if x is a `kind` (int or float) within [low, high] (open ends where asked), else what it must be,
    e.g. "must be an integer >= 1 (got 0)". The one range check: flag types and rlsp.Settings.errors use it."""
    name = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
              f"{'<' if high_open else '<='} {high}" if high is not None else ""]
    want = f"must be {name} {' and '.join(b for b in bounds if b)}".strip()
    if not isinstance(x, (int, float)) or isinstance(x, bool) or (kind is int and not isinstance(x, int)) or x != x \
            or (low is not None and (x < low or (low_open and x == low))) \
            or (high is not None and (x > high or (high_open and x == high))):
        return f"{want} (got {x!r})"
    return None


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends where asked), whose error
    says the range, e.g. "must be an integer >= 1 (got '-2')"."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = text
        problem = out_of_range(x, kind, low, high, low_open, high_open)
        if problem:
            raise argparse.ArgumentTypeError(problem.replace(f"(got {x!r})", f"(got {text!r})"))
        return x
    parse.__name__ = out_of_range(None, kind, low, high, low_open, high_open)[len("must be "):].split(" (got")[0]
    return parse


positive = number(int, 1)           # counts and sizes
non_negative = number(int, 0)       # counts where 0 means "off" (documented at the flag)
fraction = number(float, 0, 1, low_open=True)  # (0, 1]: top-p


def changed_flags(saved, args, names, defaults):
    """The flags among `names` whose value in `args` differs from the run saved as `saved` (its args.json),
    as "--flag old -> new". A flag newer than the saved run is not in it: that run behaved as the flag's
    default (a flag is added with a default that keeps the old behaviour), so the default stands in."""
    out = []
    for k in names:
        old = saved.get(k, defaults.get(k))
        if old != getattr(args, k):
            out.append(f"--{k.replace('_', '-')} {old!r} -> {getattr(args, k)!r}")
    return out


def check_device(parser, device, torchrun=False):
    """--device: cpu, cuda or cuda:N, with N a GPU this process sees; under torchrun each process takes
    cuda:LOCAL_RANK, so an index there is refused rather than ignored."""
    if not device:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        parser.error(f"--device must be cpu, cuda or cuda:N (got {device!r})")
    if kind == "cpu":
        return
    import torch
    if not torch.cuda.is_available():
        parser.error(f"--device {device}: this torch build sees no CUDA device (torch.cuda.is_available() is False)")
    if index and torchrun:
        parser.error(f"--device {device}: under torchrun each process takes the GPU of its local rank; pass "
                     f"--device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if index and int(index) >= torch.cuda.device_count():
        parser.error(f"--device {device}: this process sees {torch.cuda.device_count()} GPU(s), cuda:0 to "
                     f"cuda:{torch.cuda.device_count() - 1}")


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
