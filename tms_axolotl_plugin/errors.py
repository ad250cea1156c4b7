"""One exception family for the plugin, so callers can catch TMS failures as a group."""


class TMSError(RuntimeError):
    """A TMS stage cannot proceed; the message says which setting or file and what to do."""


class TMSConfigError(TMSError, ValueError):
    """A `tms:` setting or its combination with the rest of the Axolotl config is invalid."""
