"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

import logging


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class NonFiniteError(UsageError):
    """A NaN or inf, named where it starts (a weight of the input, a block's activations, a Hessian)."""


def overflow_hint(dtype: object) -> str:
    """Whether a run in ``dtype`` (a torch dtype) likely overflowed, and the ``--dtype`` that holds the values."""
    name = str(dtype).removeprefix("torch.")
    if name == "float16":
        return ("float16 overflow is the likely cause (its largest value is 65504): pass --dtype bfloat16 or"
                " --dtype float32")
    if name == "bfloat16":
        return ("bfloat16 has float32's range, so not an overflow of it: try --dtype float32, else the input's"
                " weights or the calibration text produce them")
    return "not a float16 overflow: the input's weights or the calibration text produce them"


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
