"""The `kdpipe` command: run and validate distillation jobs.

Every user mistake surfaces as a `UserError`, caught once here: one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import gc

from kdpipe.cli import commands
from kdpipe.cli.parser import build_parser
from kdpipe.cli.views import err_console
from kdpipe.errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("validate", "run", "status", "report"):
            commands.enter_storage(args)
        return commands.COMMANDS[args.command](args)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    finally:
        # The interpreter's last garbage collection walks every object torch and MLflow made at import (over a
        # second); whatever the command left behind is freed at exit by reference counting anyway.
        gc.freeze()
