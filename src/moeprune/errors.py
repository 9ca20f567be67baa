"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (wrong path, dense model, bad data, ...).
The CLI prints its message as one line and exits with code 2; it never shows a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: one line that names the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f"; {self.fix.rstrip('.')}"
        return text + "."
