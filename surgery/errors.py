"""The one base class of bad-input errors: the CLI prints their one-line message and exits 2."""


class UserError(Exception):
    """Bad input (a file, a plan, data, an unsupported model); the message names the file and the problem."""


class PlanError(UserError):
    """The requested plan cannot be built (one-line message for the CLI)."""


class CheckpointError(UserError):
    """Bad input: the message is one line naming the file and the problem.

    Defined here so that every module of `surgery.io` can raise it without import cycles;
    `surgery.io.CheckpointError` and `surgery.io.safetensors_file.CheckpointError` are this class.
    """
