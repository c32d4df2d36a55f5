"""The one exception type for user mistakes.

Anything a user can fix (a bad config key, an unknown model, a placement that
matches nothing, a rank too large) raises ``UserError`` with one clear sentence.
The CLI prints it as a single line and exits with code 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line (exit code 2)."""
