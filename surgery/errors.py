"""The one base class of bad-input errors: the CLI prints their one-line message and exits 2."""


class UserError(Exception):
    """Bad input (a file, a plan, data, an unsupported model); the message names the file and the problem."""
