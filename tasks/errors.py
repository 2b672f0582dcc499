"""The errors expertbits raises for bad input: each names what is wrong and how to fix it.

They subclass ValueError (not OSError) on purpose: Prefect retries I/O errors, and a bad
checkpoint or an impossible budget must fail at once instead of being retried.
"""


class ExpertbitsError(ValueError):
    """Bad input. `fix` tells the user what to do about it."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}")


class CheckpointError(ExpertbitsError):
    """A checkpoint is unreadable, truncated, not MoE, or not what the run expects."""


class BudgetError(ExpertbitsError):
    """The requested bit budget cannot be met with the available bit-widths."""


class StoreError(ExpertbitsError):
    """The artifact store cannot be reached or written."""


class ValidationFailed(ExpertbitsError):
    """A kernel or a quantized tensor disagrees with its reference."""
