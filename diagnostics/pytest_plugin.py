"""Public path of ``diagnostics.properties.pytest_plugin`` (kept for users' imports): this name is that module."""

import sys

from diagnostics.properties import pytest_plugin as _home

sys.modules[__name__] = _home
