"""The one error hierarchy. Only the CLI entry point catches these and turns them into one line + exit code."""

from __future__ import annotations

# Exit codes, documented in docs/cli.md. 75 is EX_TEMPFAIL from sysexits.h: "try again later", which is what
# a Slurm requeue wrapper wants to see after a preemption signal.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RESUMABLE = 75
EXIT_INTERRUPTED = 130


class StackwiseError(Exception):
    """A user-facing error: what was expected, what was found, and the command that fixes it (``hint``)."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class RecipeError(StackwiseError):
    """A recipe (or --set override) that does not validate."""


class ManifestError(StackwiseError):
    """The manifest is missing, unreadable, or does not validate."""


class ProjectError(StackwiseError):
    """A missing stage, unknown stack id, or a project in a state that cannot do what was asked."""


class CorruptFileError(StackwiseError):
    """A file that is truncated, unreadable, or whose checksum disagrees with the manifest."""


class ChecksumMismatch(CorruptFileError):
    """A file whose bytes are not the ones the manifest records (corrupt, or rewritten since it was read)."""


class StaleError(StackwiseError):
    """An artifact whose producers have changed since it was written."""


class DataError(StackwiseError):
    """Input text, tokenizer or shards that cannot be used."""


class Stopped(StackwiseError):
    """Work stopped early on a signal after saving a checkpoint; rerun to resume."""

    exit_code = EXIT_RESUMABLE
