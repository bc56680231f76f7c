"""Errors that the command line reports as one line and exit status 2."""


class UsageError(ValueError):
    """Invalid input from the user: an argument, a study file, a data folder or a URL.

    The message names the value and the fix. The command line prints it alone on one line
    to stderr and exits with status 2.
    """


class DivergedError(FloatingPointError):
    """A task's loss became NaN or infinite at ``epoch``, in the task named ``task``."""

    def __init__(self, task: str, epoch: int, value: float) -> None:
        super().__init__(
            f"loss of task {task!r} is {value} at epoch {epoch}; lower the learning rate"
            " or check the task's data"
        )
        self.task = task
        self.epoch = epoch
        self.value = value
