"""Descriptors that turn atomic structures into rows of a sparse feature matrix.

Callers go through the registry, so that a new descriptor needs no change to them::

    descriptor = get_descriptor({'name': 'soap', 'r_cut': 6.0, 'n_max': 5, 'l_max': 5}).fit(structures)
    for block in descriptor.iter_blocks(structures):
        ...  # write the CSR block
    record(descriptor.parameters)  # explicit species list included, enough to recreate the feature space
"""

from .base import (
    DEFAULT_BLOCK_SIZE,
    Descriptor,
    StructureNotDescribableError,
    get_descriptor,
    get_descriptor_class,
    register_descriptor,
    registered_descriptors,
)
from .soap import SpeciesAwareSOAP

__all__ = (
    'DEFAULT_BLOCK_SIZE',
    'Descriptor',
    'SpeciesAwareSOAP',
    'StructureNotDescribableError',
    'get_descriptor',
    'get_descriptor_class',
    'register_descriptor',
    'registered_descriptors',
)
