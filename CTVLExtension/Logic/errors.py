"""Errors that `ctvl` raises on purpose: each names the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class CTVLError(Exception):
    """Base class for every error `ctvl` raises deliberately (the CLI turns these into exit code 2)."""


class CTVLInputError(CTVLError):
    """Bad input: a file that is not a usable CT, empty text, a malformed CSV row, ...

    ``str(err)`` is one line: ``"<source>: <problem>. <hint>"``.
    """

    def __init__(self, source: str | Path | None, problem: str, hint: str = "") -> None:
        self.source = str(source) if source is not None else None
        self.problem = problem.rstrip(".")
        self.hint = hint
        parts = [f"{self.source}: {self.problem}" if self.source else self.problem]
        message = parts[0] + "."
        if hint:
            message += " " + hint.rstrip(".") + "."
        super().__init__(message)


class CTVLWeightsError(CTVLInputError):
    """A weights directory that is missing, corrupt, or does not match its config."""


class CTVLDependencyError(CTVLError):
    """An optional dependency is missing; the message says what to install."""


class CTVLCancelled(CTVLError):
    """Long work was cancelled by the user (through a cancel flag/callback)."""
