"""`behemoth <command>`: the parser, the one-line error report, the exit codes. The commands themselves
are plain functions in `behemoth/commands/` (`models`, `training`, `inference`).

Bad input (unknown preset, missing file, corrupt checkpoint, bad option) prints one line
`behemoth <cmd>: error: ...` and exits with code 2, never a traceback. `train`, `distill`, `codistill`
and `distill-cache` share one config surface: a TOML `--config` file and dotted overrides
(`--data.seq_len=128`), checked against `behemoth.train.config`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from behemoth import ranks
from behemoth.commands import inference, models, training
from behemoth.commands.common import Parser, UsageError
from behemoth.train.faults import PeerLost
from behemoth.train.trainer import Interrupted, TrainingStopped

COMMAND_GROUPS = (models, training, inference)  # the order of `behemoth --help`: inspect, make, run


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="behemoth", description="The Llama 4 model family: build, inspect, convert, run.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def _report(msg: str, every_rank: bool = False) -> None:
    """An error line on stderr. In a distributed run rank 0 reports what every rank meets alike (an
    interruption; bad settings, checked before the process group forms, which the first rank of every
    other machine reports too, in case that machine differs); a later error on another rank is reported by
    that rank. Ranks other than 0 mark their lines with their number."""
    rank, first_here = ranks.launcher_rank(), int(os.environ.get("LOCAL_RANK", "0")) == 0
    if rank == 0 or (every_rank and (ranks.joined() or first_here)):
        print(msg if rank == 0 else f"[rank {rank}] {msg}", file=sys.stderr)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "allow_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        args.fn(args)
    except UsageError as e:
        _report(str(e))
        return 2
    except Interrupted as e:
        _report(f"behemoth: {e}; continue with --resume")
        return 128 + e.signum
    except PeerLost as e:  # every surviving rank says so: which ranks survived is what the user needs to know
        print(f"behemoth {getattr(args, 'command', 'train')}: {e}", file=sys.stderr, flush=True)
        return 1
    except TrainingStopped as e:
        _report(f"behemoth train: stopped: {e}")
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        cmd = getattr(locals().get("args"), "command", "")
        _report(f"behemoth {cmd}: error: {e}".replace("  ", " "), every_rank=True)
        return 2
    return 0


RANK0_GRACE_S = 5.0  # how long a failing rank other than 0 waits for rank 0 to report, before the group forms


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if code != 0 and not ranks.joined() and ranks.launcher_rank() != 0:
        # bad settings, found on every rank alike and reported by rank 0: torchrun stops every rank at the first
        # one that exits, and rank 0 (which may have started later) must not be stopped before it has said why
        time.sleep(RANK0_GRACE_S)
    if ranks.joined():  # a distributed run (torchrun) in this process
        from behemoth.parallel.distributed import teardown

        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:  # on failure the other ranks may be stuck in a collective: torchrun stops them
            teardown()
        # gloo's threads can abort the interpreter's shutdown after a finished run (std::terminate), turning
        # success into a failure torchrun reports: leave without it
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
