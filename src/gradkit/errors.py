"""The one error type users see: a single line naming the problem and the fix."""

from __future__ import annotations


class GradkitError(ValueError):
    """Bad input or configuration. The message is one line: what is wrong, where, and what to do.

    The CLI prints it as ``gradkit: error: <message>`` and exits with status 2, without a traceback.
    """
