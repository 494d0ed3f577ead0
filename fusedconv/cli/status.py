"""What a `fusedconv` command ends with: its exit status, the tolerance that decides pass or fail, and the
one-line user error (printed without a traceback)."""

from __future__ import annotations

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
# Max relative error (vs the original model, same dtype) that --check and demo accept.
CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 5e-2}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status EXIT_USAGE."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
