"""One exception for bad user input, the wrapper that turns it into a one-line error, and how a rank leaves."""

import atexit
import os
import sys
import traceback


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


def cli(main, rank_process: bool = False):
    """Run `main()`; a UserError becomes `error: <message>` on stderr (once, by rank 0) and exit code 2.

    A rank process (`rank_process`) leaves through `leave` whatever happens, a traceback included."""
    try:
        main()
        code = 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        if not rank_process:
            raise
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        if not rank_process:
            raise
        traceback.print_exc()
        code = 1
    if rank_process:
        leave(code)
    sys.exit(code)


def leave(code: int) -> None:
    """End a rank process without the interpreter's teardown. Torch's process groups, their stores and threads are
    destroyed there in no fixed order, and a rank that leaves while its peers are gone (or leaving) could abort in
    C++ ("terminate called without an active exception", exit -6) after a clean run or a one-line error. Python's
    exit handlers (wandb, logging) still run and the output is flushed; the OS closes the sockets."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
