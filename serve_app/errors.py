"""The service's errors, defined with the rest of the tree in `actors.errors` (kept importable from here)."""

from actors.errors import *  # noqa: F403
from actors.errors import __all__  # noqa: F401
