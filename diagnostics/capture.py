"""Public path of ``diagnostics.properties.capture`` (kept for users' imports): this name is that module."""

import sys

from diagnostics.properties import capture as _home

sys.modules[__name__] = _home
