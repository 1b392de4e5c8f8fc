"""The `gateway` command: `serve`, `config check`, `rules test`, and control socket verbs.

Exit status: 0 success, 1 the operation failed, 2 bad usage or a bad config, 130 interrupted.

The commands live by group, each module with its `cmd_*` functions and the `add_commands`
that registers them (`parser.py` calls them in the order `gateway --help` lists them):

- `serve.py`: serve, config check
- `store.py`: status, audit, backup, studies list/show/delete/force-complete
- `jobs.py`: jobs list/retry/cancel
- `health.py`: health, echo
- `rules.py`: rules test/test-study/reload
- `retrieve.py`: retrieve submit/status/retry/cancel/limits
- `acquire.py`: control hash-token, devices, sequences, tasks

`common.py` has the config path, the settings and the control socket call they share;
`output.py` the tables, listings and byte sizes they print.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gateway.errors import ConfigError, ControlError, GatewayError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command *argv* (default: the process's arguments); return its exit status.

    A `ConfigError` is printed and gives 2, a `ControlError` or another `GatewayError` 1,
    Ctrl-C 130; a reader that went away (`gateway audit | head`) ends it quietly with 0.
    Bad usage exits 2 from argparse.
    """
    from gateway.cli.parser import build_parser  # here: importing gateway.cli.output is light

    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # a reader that went away shows here, not at the exit
        return code
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"gateway: {exc.message} (error {exc.code})", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gateway audit | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
