"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

import logging


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every retry; the message names the knob to turn."""


def quiet_hub_logging() -> None:
    """Silence the retry and progress chatter of the hub clients: it would turn our one-line errors into a page."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    for name in ("fsspec", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
