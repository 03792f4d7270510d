"""Attributes of stored data nodes read from one snapshot: aiida-core re-reads a stored node's attributes from the
database on every access outside a transaction, and the data types read theirs on every block of rows."""

from __future__ import annotations

import typing as t

__all__ = ('AttributeSnapshot',)


class AttributeSnapshot:
    """Mixin of a ``Data`` class (before it in the bases): :meth:`_attribute` reads a stored (immutable) node's
    attributes from one snapshot."""

    is_stored: bool
    base: t.Any

    def _attribute(self, name: str, default: t.Any = None) -> t.Any:
        """An attribute; of a stored node, from one snapshot instead of a database query per access."""
        if not self.is_stored:
            return self.base.attributes.get(name, default)
        snapshot = self.__dict__.get('_attribute_snapshot')
        if snapshot is None:
            snapshot = self.__dict__['_attribute_snapshot'] = self.base.attributes.all
        return snapshot.get(name, default)
