"""Errors a person can act on: each carries every problem found, one line per problem."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class for errors that the CLI prints as plain messages (never a traceback)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))




class VocabularyError(ApplianceError):
    """The o200k vocabulary could not be found or failed its hash check."""
