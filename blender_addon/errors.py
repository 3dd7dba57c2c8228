"""The one exception type the UI shows as is (stdlib only)."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input or a state the user can fix; the message says what and how. The scene is untouched."""
