"""Command line interface of aiida-mlworkbench (``aiida-mlworkbench --help``).

Every sub-command module is imported here so that it registers itself on :data:`cmd_root`.
"""

from . import plot, synthetic  # noqa: F401  (register `aiida-mlworkbench plot` and `synthetic`)
from .root import cmd_root

__all__ = ('cmd_root',)
