"""Linear-time provenance links for processes with thousands of inputs or outputs.

aiida-core 2.9 validates each new link of a process on its own: every input link runs a graph query to rule out a cycle
and scans all input links added before it, comparing nodes by value (``Dict.__eq__`` compares contents); every output
link queries the outgoing links stored so far. That is fine for the handful of inputs of a DFT calculation, but a
process that consumes 7100 ``impurity_info`` nodes and creates 7100 clusters spent minutes in it (1000 clusters in one
process took 304 s, 63 s in batches of 100; ``benchmarks/provenance_links.py``).

:class:`BulkLinks` gives a process the same links, with the same rules checked, in time linear in their number:

* Inputs are linked while the process node is still unstored, which is always the case when the engine sets them up.
  A node that is not stored yet has no descendants, so no new input link can close a cycle: the graph query is skipped.
  Link labels are unique because they are the flattened port names; the remaining rules (source is ``Data``, same
  storage backend, valid label, the process node is not sealed) are checked per link, in constant time.
* Outputs: the labels already linked are read once per call; each new output of a calculation gets its ``CREATE``
  link checked the same way, each node a workflow returns its ``RETURN`` link in one bulk insert, all in one
  transaction (aiida-core commits after each, and a commit expires every node loaded in the session). Anything
  unusual (a stored output of a calculation, an unstored output of a workflow) goes through aiida-core's own
  :meth:`~aiida.orm.nodes.links.NodeLinks.add_incoming`, which raises as it always does.

Use :func:`calcfunction` (a drop-in for :func:`aiida.engine.calcfunction`) for process functions, and :class:`BulkLinks`
as the first base class of a ``WorkChain``.
"""

from __future__ import annotations

import contextlib
import typing as t

from aiida import engine, orm
from aiida.common.links import LinkType, validate_link_label
from aiida.orm.entities import EntityTypes
from aiida.orm.utils.links import LinkTriple

from aiida_mlworkbench.process_hashing import use_stored_input_hashes

__all__ = ('BulkLinks', 'calcfunction')

F = t.TypeVar('F', bound=t.Callable[..., t.Any])


class BulkLinks:
    """Process mixin: attach input and output links in time linear in their number (see the module docstring).

    Must come before the ``Process`` class in the bases, e.g. ``class MyWorkChain(BulkLinks, WorkChain)``.
    """

    node: orm.ProcessNode

    def _setup_inputs(self) -> None:
        """Link every input node to the (unstored) process node; same links and rules as ``Process._setup_inputs``."""
        node = self.node
        if isinstance(node, orm.CalculationNode):
            link_type = LinkType.INPUT_CALC
        elif isinstance(node, orm.WorkflowNode):
            link_type = LinkType.INPUT_WORK
        else:  # pragma: no cover - aiida-core's test processes only
            super()._setup_inputs()  # type: ignore[misc]
            return
        if node.is_stored or node.is_sealed:
            raise ValueError(f'{node} is already stored: input links can only be added to a new process node.')
        use_stored_input_hashes(node)

        cache = node.base.links.incoming_cache
        labels = {triple.link_label for triple in cache}
        for label, source in self._flat_inputs().items():  # type: ignore[attr-defined]
            if source is None:
                continue
            _check_input_link(source, node, link_type, label, labels)
            source.base.links.validate_outgoing(node, link_type, label)
            cache.append(LinkTriple(source, link_type, label))
            labels.add(label)

    def update_outputs(self) -> None:
        """Attach the outputs added since the last call; same links and rules as ``Process.update_outputs``.

        Everything happens in one storage transaction, committed once: outputs are stored together or not at all, and
        the returned nodes of a workflow get their links in one bulk insert.
        """
        if self.metadata.store_provenance is False:  # type: ignore[attr-defined]
            return
        node = self.node
        link_type = LinkType.CREATE if isinstance(node, orm.CalculationNode) else LinkType.RETURN
        linked = set(
            node.base.links.get_outgoing(link_type=(LinkType.CREATE, LinkType.RETURN)).all_link_labels()
            if node.is_stored
            else ()
        )
        returned: list[dict[str, t.Any]] = []
        # aiida-core's nested transaction commits the outer one, which closes it under its owner: open one only if none.
        backend = node.backend
        with contextlib.nullcontext() if backend.in_transaction else backend.transaction():
            for label, output in self._flat_outputs().items():  # type: ignore[attr-defined]
                if label in linked:
                    continue
                if _is_plain_output(output, link_type):
                    validate_link_label(label)
                    node.base.links.validate_outgoing(output, link_type, label)
                    if link_type is LinkType.CREATE:
                        output.base.links.incoming_cache.append(LinkTriple(node, link_type, label))
                        output.store()
                    else:
                        returned.append(
                            {'input_id': node.pk, 'output_id': output.pk, 'label': label, 'type': link_type.value}
                        )
                else:
                    output.base.links.add_incoming(node, link_type, label)
                    output.store()
                linked.add(label)
            if returned:
                backend.bulk_insert(EntityTypes.LINK, returned)


def _check_input_link(source: t.Any, target: orm.ProcessNode, link_type: LinkType, label: str, labels: set) -> None:
    """The rules of :func:`aiida.orm.utils.links.validate_link` that can fail for an input of a new process node."""
    if not isinstance(source, orm.Data):
        raise ValueError(f'cannot add a {link_type} link from {type(source)} to {type(target)}: inputs must be Data.')
    if source.backend is not target.backend and source.backend != target.backend:
        raise ValueError(f'input `{label}` is stored in {source.backend}, the process in {target.backend}.')
    try:
        validate_link_label(label)
    except ValueError as exception:
        raise ValueError(f'invalid link label `{label}`: {exception}') from exception
    if label in labels:
        raise ValueError(f'{target} already has an incoming {link_type} link with label "{label}"')


def _is_plain_output(output: orm.Data, link_type: LinkType) -> bool:
    """Whether an output takes the common path: a new node created by a calculation, a stored one returned by a
    workflow. Any other case goes through aiida-core's own validation."""
    if link_type is LinkType.CREATE:
        return not output.is_stored and not any(
            triple.link_type is LinkType.CREATE for triple in output.base.links.incoming_cache
        )
    return output.is_stored


def calcfunction(function: F) -> F:
    """:func:`aiida.engine.calcfunction` whose process links its inputs and outputs with :class:`BulkLinks`.

    The node, its links and its hash are exactly those of a plain calcfunction; only the link bookkeeping is faster.
    """
    decorated = engine.calcfunction(function)
    process_class = decorated.process_class  # type: ignore[attr-defined]
    process_class.__bases__ = (BulkLinks, *process_class.__bases__)
    return decorated  # type: ignore[no-any-return]
