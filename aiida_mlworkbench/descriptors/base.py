"""The descriptor interface: structures in, rows of a sparse feature matrix out.

A descriptor is defined entirely by its :attr:`Descriptor.parameters`, a JSON-serialisable dictionary whose ``name``
selects the implementation in the registry. That dictionary is what gets recorded in the provenance graph, so
:func:`get_descriptor` on it must give back a descriptor that produces the same feature space. Options that change how
fast the features are computed but not their values (such as ``n_jobs``) are deliberately kept out of it, so that two
featurizations with equal features have equal parameters (and equal hashes for AiiDA caching).
"""

from __future__ import annotations

import abc
import inspect
import typing as t
from collections.abc import Iterator, Mapping, Sequence

import scipy.sparse

if t.TYPE_CHECKING:
    import ase

__all__ = (
    'DEFAULT_BLOCK_SIZE',
    'Descriptor',
    'StructureNotDescribableError',
    'get_descriptor',
    'get_descriptor_class',
    'register_descriptor',
    'registered_descriptors',
)

#: Rows per block when none is given: a few MB of CSR for SOAP at n_max = l_max = 9.
DEFAULT_BLOCK_SIZE = 256

DescriptorType = t.TypeVar('DescriptorType', bound='Descriptor')

_REGISTRY: dict[str, type[Descriptor]] = {}


class StructureNotDescribableError(ValueError):
    """A structure cannot be described (for example it holds a species outside the species list).

    ``index`` is the position of the structure in the input, so that callers can name it in their own terms.
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class Descriptor(abc.ABC):
    """Turns a sequence of :class:`ase.Atoms` into rows of a sparse feature matrix, one row per structure.

    Implementations must never build a dense row over the full feature space, nor a dense matrix: the feature spaces of
    interest have 1e5 to 1e6 columns of which a few hundred are non-zero per row.
    """

    #: Registry key, stored as ``parameters['name']``.
    name: t.ClassVar[str]

    @property
    @abc.abstractmethod
    def n_features(self) -> int:
        """Number of columns of the feature matrix."""

    @property
    @abc.abstractmethod
    def parameters(self) -> dict[str, t.Any]:
        """JSON-serialisable parameters, including ``name``, from which :meth:`from_parameters` recreates it."""

    @abc.abstractmethod
    def iter_blocks(
        self, structures: Sequence[ase.Atoms], block_size: int = DEFAULT_BLOCK_SIZE
    ) -> Iterator[scipy.sparse.csr_array]:
        """Yield the feature rows of ``structures`` in input order, at most ``block_size`` rows at a time.

        Memory is bounded by one block, so that callers can write blocks to disk as they come.
        """

    def fit(self: DescriptorType, structures: Sequence[ase.Atoms]) -> DescriptorType:
        """Fix whatever the feature space depends on in the data (for example the species list) and return ``self``.

        The default does nothing: descriptors whose feature space is fixed by their parameters need no fitting.
        """
        return self

    def create(self, structures: Sequence[ase.Atoms], block_size: int = DEFAULT_BLOCK_SIZE) -> scipy.sparse.csr_array:
        """Return the whole feature matrix as one CSR array, for data that fits in memory."""
        blocks = list(self.iter_blocks(structures, block_size=block_size))
        if not blocks:
            return scipy.sparse.csr_array((0, self.n_features), dtype=self.dtype)
        return scipy.sparse.csr_array(scipy.sparse.vstack(blocks, format='csr'))

    @property
    def dtype(self) -> str:
        """Floating point type of the feature values."""
        return 'float64'

    @classmethod
    def from_parameters(cls: type[DescriptorType], parameters: Mapping[str, t.Any], **options: t.Any) -> DescriptorType:
        """Recreate a descriptor from :attr:`parameters`; ``options`` are run-time settings such as ``n_jobs``."""
        parameters = dict(parameters)
        name = parameters.pop('name', cls.name)
        if name != cls.name:
            raise ValueError(f'parameters are for descriptor {name!r}, not {cls.name!r}')
        accepted = inspect.signature(cls).parameters.values()
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in accepted):
            known = {parameter.name for parameter in accepted} - set(options)
            unknown = sorted(map(str, set(parameters) - known))
            if unknown:
                raise ValueError(
                    f'unknown parameter(s) {", ".join(map(repr, unknown))} of descriptor {cls.name!r}: its parameters '
                    f'are {", ".join(sorted(known))}'
                )
        return cls(**parameters, **options)

    def __repr__(self) -> str:
        arguments = ', '.join(f'{key}={value!r}' for key, value in self.parameters.items() if key != 'name')
        return f'{type(self).__name__}({arguments})'


def register_descriptor(cls: type[DescriptorType]) -> type[DescriptorType]:
    """Class decorator that makes a descriptor available to :func:`get_descriptor` under ``cls.name``."""
    name = getattr(cls, 'name', None)
    if not isinstance(name, str) or not name:
        raise TypeError(f'{cls.__name__} needs a non-empty string class attribute `name` to be registered')
    registered = _REGISTRY.get(name)
    if registered is not None and registered is not cls:
        raise ValueError(f'descriptor name {name!r} is already taken by {registered.__module__}.{registered.__name__}')
    _REGISTRY[name] = cls
    return cls


def registered_descriptors() -> tuple[str, ...]:
    """Names of the registered descriptors, sorted."""
    return tuple(sorted(_REGISTRY))


def get_descriptor_class(name: str) -> type[Descriptor]:
    """Return the descriptor class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ', '.join(registered_descriptors()) or 'none'
        raise ValueError(f'unknown descriptor {name!r}; registered descriptors: {known}') from None


def get_descriptor(parameters: Mapping[str, t.Any], **options: t.Any) -> Descriptor:
    """Build the descriptor that ``parameters`` (as given by :attr:`Descriptor.parameters`) describe.

    :param parameters: must hold ``name``, the registry key; the rest goes to the class's ``from_parameters``.
    :param options: run-time settings that do not change the features, for example ``n_jobs``.
    """
    if not isinstance(parameters, Mapping):
        raise ValueError(
            f"descriptor parameters must be a dictionary such as {{'name': 'soap', ...}}, got {parameters!r}"
        )
    if 'name' not in parameters:
        raise ValueError(f'descriptor parameters need a `name`, one of: {", ".join(registered_descriptors())}')
    if not isinstance(parameters['name'], str):
        raise ValueError(
            f'descriptor `name` must be a string, one of: {", ".join(registered_descriptors())}; '
            f'got {parameters["name"]!r}'
        )
    return get_descriptor_class(parameters['name']).from_parameters(parameters, **options)
