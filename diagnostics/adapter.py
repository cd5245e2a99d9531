"""Public path of ``diagnostics.properties.adapter`` (kept for users' imports): this name is that module."""

import sys

from diagnostics.properties import adapter as _home

sys.modules[__name__] = _home
