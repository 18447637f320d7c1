class ShrinkError(Exception):
    """A user-facing error: the CLI prints its message as one line (traceback only with --debug)."""
