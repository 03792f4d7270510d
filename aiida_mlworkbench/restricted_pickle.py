"""A restricted unpickler for scikit-learn estimators: loading a model someone sent you must not run their code.

A pickle is a small program: it names any importable callable and calls it. :class:`RestrictedUnpickler` admits only

* classes defined in scikit-learn, NumPy and SciPy, and in :mod:`aiida_mlworkbench.estimators` (resolved first, so
  that a foreign class re-exported by one of them, such as threadpoolctl's ``ThreadpoolController``, is refused), minus
  a deny-list of classes and modules that touch files, the network or run code (``numpy.memmap``, ``numpy.testing``,
  ``scipy.io``, ...);
* the handful of functions these libraries use to rebuild their objects (``numpy._core.multiarray._reconstruct``, the
  NumPy random-state constructors, Cython's ``__pyx_unpickle_*`` helpers);
* harmless builtins (containers, numbers, strings) and ``collections.OrderedDict``;
* any global of a module (or package) that the caller names in ``trusted``.

Everything else, for example ``os.system``, ``subprocess.Popen`` or ``builtins.eval``, is refused with
:class:`UnsafePickleError` *before* the module is even imported, so nothing of it runs.
"""

from __future__ import annotations

import importlib
import io
import pickle
import typing as t
from collections.abc import Iterable

__all__ = ('DEFAULT_ALLOWED_PACKAGES', 'RestrictedUnpickler', 'UnsafePickleError', 'restricted_loads')

#: Packages whose classes are admitted: the libraries, and this package's own estimator parts (such as the SOAP kernel).
DEFAULT_ALLOWED_PACKAGES: tuple[str, ...] = ('sklearn', 'numpy', 'scipy', 'aiida_mlworkbench.estimators')

#: Modules (and their sub-modules) of the admitted packages that are never admitted: they read or write files, open
#: URLs or run code.
DENIED_MODULES: tuple[str, ...] = (
    'numpy.testing',
    'numpy.f2py',
    'numpy.distutils',
    'numpy.lib._datasource',
    'numpy.lib.npyio',
    'numpy.lib._npyio_impl',
    'numpy.lib.format',
    'numpy.lib._format_impl',
    'numpy._core.memmap',
    'numpy.ctypeslib',
    'numpy._pytesttester',
    'scipy.io',
    'scipy.datasets',
    'scipy._lib._testutils',
    'scipy.weave',
    'sklearn.datasets',
    'sklearn.utils._testing',
    'sklearn.utils._show_versions',
    'sklearn.externals',
)

#: Functions (not classes) that scikit-learn, NumPy and SciPy pickles call to rebuild their objects.
RECONSTRUCTORS: frozenset[tuple[str, str]] = frozenset(
    {
        ('numpy._core.multiarray', '_reconstruct'),
        ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'),
        ('numpy._core.numeric', '_frombuffer'),
        ('numpy.core.numeric', '_frombuffer'),
        ('numpy.random._pickle', '__randomstate_ctor'),
        ('numpy.random._pickle', '__bit_generator_ctor'),
        ('numpy.random._pickle', '__generator_ctor'),
        ('copyreg', '_reconstructor'),
    }
)

#: Builtins and standard-library classes that only build plain values.
SAFE_BUILTINS: frozenset[tuple[str, str]] = frozenset(
    {('builtins', name) for name in ('bool', 'bytearray', 'bytes', 'complex', 'dict', 'float', 'frozenset', 'int')}
    | {('builtins', name) for name in ('list', 'object', 'range', 'set', 'slice', 'str', 'tuple')}
    | {('collections', 'OrderedDict'), ('datetime', 'datetime'), ('datetime', 'date'), ('datetime', 'timedelta')}
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global that the restricted unpickler does not admit; nothing of it was run."""


def _within(module: str, packages: Iterable[str]) -> bool:
    return any(module == package or module.startswith(f'{package}.') for package in packages)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals described in the module docstring.

    :param file: binary file object holding the pickle.
    :param trusted: modules or packages whose globals are all admitted (for estimator parts defined outside
        scikit-learn, NumPy and SciPy). Only name code you trust: its globals can run anything.
    :param source: a description of where the pickle comes from, used in error messages.
    """

    def __init__(self, file: t.IO[bytes], *, trusted: Iterable[str] = (), source: str = 'the pickle') -> None:
        super().__init__(file)
        self.trusted = tuple(trusted)
        self.source = source

    def _refuse(self, module: str, name: str, why: str) -> t.NoReturn:
        raise UnsafePickleError(
            f'refusing to load `{module}.{name}` from {self.source}: {why}. Only classes of scikit-learn, NumPy and '
            'SciPy are admitted, so that loading a model cannot run foreign code. If you trust whoever made this file '
            f'and `{module}` is code you have installed and trust, pass trusted=[{module!r}].'
        )

    def find_class(self, module: str, name: str) -> t.Any:
        if _within(module, self.trusted):
            return super().find_class(module, name)
        if (module, name) in SAFE_BUILTINS:
            return super().find_class(module, name)
        if '.' in name:
            self._refuse(module, name, 'dotted attribute paths are never admitted')
        if (module, name) in RECONSTRUCTORS:
            return super().find_class(module, name)
        if not _within(module, DEFAULT_ALLOWED_PACKAGES):
            self._refuse(module, name, f'module `{module}` is not admitted')
        if _within(module, DENIED_MODULES):
            self._refuse(module, name, f'module `{module}` can touch files or run code')
        if name.startswith('__pyx_unpickle_'):
            # Cython's generated helper that rebuilds an extension type of this very module.
            return super().find_class(module, name)

        # The module name is admitted: importing it runs only the code of the admitted libraries.
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None:
            self._refuse(module, name, 'no such global')
        if not isinstance(obj, type):
            self._refuse(module, name, 'it is a function, not a class')
        real_module = getattr(obj, '__module__', '') or ''
        if not _within(real_module, DEFAULT_ALLOWED_PACKAGES) or _within(real_module, DENIED_MODULES):
            self._refuse(module, name, f'it is really defined in `{real_module}`')
        if _is_denied_class(obj):
            self._refuse(module, name, 'it can touch files')
        return obj


def _is_denied_class(cls: type) -> bool:
    """Classes of the admitted packages that map or open files."""
    import numpy

    return issubclass(cls, numpy.memmap) or issubclass(cls, io.IOBase)


def restricted_loads(data: bytes, *, trusted: Iterable[str] = (), source: str = 'the pickle') -> t.Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    :raises UnsafePickleError: if the pickle asks for a global that is not admitted.
    """
    return RestrictedUnpickler(io.BytesIO(data), trusted=trusted, source=source).load()
