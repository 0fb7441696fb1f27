"""User-facing errors: raised for bad input or bad params, printed without a traceback.

Every message names the file or params key at fault and says what to do about it.
"""


class LmforgeError(Exception):
    """An error the user can fix (bad params, bad input files, stale outputs)."""
