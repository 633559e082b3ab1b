"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every retry; the message names the knob to turn."""
