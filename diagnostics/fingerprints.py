"""Public path of ``diagnostics.properties.fingerprints`` (kept for users' imports): this name is that module."""

import sys

from diagnostics.properties import fingerprints as _home

sys.modules[__name__] = _home
