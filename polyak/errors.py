"""One exception for bad user input, and the wrapper that turns it into a one-line error."""

import os
import sys


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


def cli(main):
    """Run `main()`; a UserError becomes `error: <message>` on stderr (once, by rank 0) and exit code 2."""
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
