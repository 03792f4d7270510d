"""Linear-time provenance links for processes with thousands of inputs or outputs.

aiida-core 2.9 validates each new link of a process on its own: every input link runs a graph query to rule out a cycle
and scans all input links added before it, comparing nodes by value (``Dict.__eq__`` compares contents); every output
link queries the outgoing links stored so far. That is fine for the handful of inputs of a DFT calculation, but a
process that consumes 7100 ``impurity_info`` nodes and creates 7100 clusters spent minutes in it (1000 clusters in one
process took 304 s, 63 s in batches of 100, measured with ``benchmarks/cluster_extraction.py`` before this module).

:class:`BulkLinks` gives a process the same links, with the same rules checked, in time linear in their number, and
stores them in a few statements instead of one SQL savepoint per link:

* Inputs are linked while the process node is still unstored, which is always the case when the engine sets them up.
  A node that is not stored yet has no descendants, so no new input link can close a cycle: the graph query is skipped.
  Link labels are unique because they are the flattened port names; the remaining rules (source is ``Data``, same
  storage backend, valid label, the process node is not sealed) are checked per link, in constant time. The node and
  its input links are stored in one transaction, the links in one insert; the node's hash takes each input's stored
  hash (:mod:`aiida_mlworkbench.process_hashing`), and is the hash aiida-core computes.
* Outputs: the labels already linked are read once per call, in one query. The new outputs of a calculation are
  validated, cleaned and hashed as ``Node.store`` does it, and stored with their ``CREATE`` links in one bulk insert
  (:func:`bulk_store`); the stored nodes replace them among the process's outputs. Each node a workflow returns gets
  its ``RETURN`` link in one bulk insert. All of it happens in one transaction (aiida-core commits after each node,
  and a commit expires every node loaded in the session). Anything unusual (a stored output of a calculation, an
  unstored output of a workflow, a node with files or a class that stores itself its own way) goes through
  aiida-core's own :meth:`~aiida.orm.nodes.links.NodeLinks.add_incoming` and ``store``, which raise as they always do.

Concurrency: every write of this module happens in a :func:`write_transaction`, which on SQLite (``core.sqlite_dos``)
takes the database's write lock with its first statement (``BEGIN IMMEDIATE``), waiting for it as long as the
connection's busy timeout allows, and holds it only for the inserts: rows, hashes and validation are prepared before.
A transaction that starts the default way (aiida-core's ``transaction()`` begins with a deferred ``SAVEPOINT``) and
reads before it writes cannot wait: SQLite refuses at once to turn its read lock into the write lock while another
process holds it, and two daemon workers failed with "database is locked". On PostgreSQL the transaction is
aiida-core's own. ``tests/test_concurrency.py`` runs two and four work chains at once on two daemon workers.

``tests/test_bulk_links.py`` and ``tests/test_process_hashing.py`` compare links, rows and hashes with aiida-core's.

Use :func:`calcfunction` (a drop-in for :func:`aiida.engine.calcfunction`) for process functions, and :class:`BulkLinks`
as the first base class of a ``WorkChain``.
"""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Iterator, Mapping

from aiida import engine, orm
from aiida.common.links import LinkType, validate_link_label
from aiida.manage import get_manager
from aiida.orm.entities import EntityTypes
from aiida.orm.utils.links import LinkTriple

from aiida_mlworkbench.node_ids import is_stored, rows_where, stored_pk
from aiida_mlworkbench.process_hashing import use_stored_input_hashes

__all__ = ('BulkLinks', 'bulk_store', 'calcfunction', 'can_bulk_store', 'write_transaction')

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
        caching = use_stored_input_hashes(node)

        labels = {triple.link_label for triple in node.base.links.incoming_cache}
        triples = []
        for label, source in self._flat_inputs().items():  # type: ignore[attr-defined]
            if source is None:
                continue
            _check_input_link(source, node, link_type, label, labels)
            source.base.links.validate_outgoing(node, link_type, label)
            triples.append(LinkTriple(source, link_type, label))
            labels.add(label)
        if caching is None or not self.metadata.store_provenance:  # type: ignore[attr-defined]
            node.base.links.incoming_cache.extend(triples)  # stored, if at all, by aiida-core with the node
            return
        # Inserted in one statement once the node is stored (``_create_and_setup_db_record``, which stored the inputs
        # given unstored before); aiida-core would insert them one by one, each in a savepoint of its own.
        caching.pending_inputs = triples

    def _create_and_setup_db_record(self) -> t.Any:
        """Create and store the process node and its input links in one transaction, the links in one insert.

        Inputs given unstored are stored first, each committed as ``store_all`` would: if the transaction fails, they
        stay stored in the database as they are in Python, and only the process node is rolled back.
        """
        backend = get_manager().get_profile_storage()
        if self.metadata.store_provenance:  # type: ignore[attr-defined]
            unstored = [
                source
                for source in self._flat_inputs().values()  # type: ignore[attr-defined]
                if isinstance(source, orm.Data) and not is_stored(source)
            ]
            for source in unstored:  # all checked before any is stored, as in ``store_all``
                source._verify_are_parents_stored()
            for source in unstored:
                source.store()
        with write_transaction(backend):
            result = super()._create_and_setup_db_record()  # type: ignore[misc]
            caching = self.node.base.caching
            pending = getattr(caching, 'pending_inputs', None)
            if pending and self.node.is_stored:
                target = self.node.pk
                backend.bulk_insert(
                    EntityTypes.LINK,
                    [
                        {
                            'input_id': stored_pk(triple.node),
                            'output_id': target,
                            'label': triple.link_label,
                            'type': triple.link_type.value,
                        }
                        for triple in pending
                    ],
                )
                caching.pending_inputs = []
        return result

    def update_outputs(self) -> None:
        """Attach the outputs added since the last call; same links and rules as ``Process.update_outputs``.

        Outputs are validated, and the rows of new calculation outputs prepared, before the write transaction; then
        everything is written in one :func:`write_transaction`, committed once: outputs are stored together or not at
        all. New outputs of a calculation are stored with their ``CREATE`` links in one bulk insert (:func:`bulk_store`)
        and the stored nodes take their place among the process's outputs; the returned nodes of a workflow get their
        links in one bulk insert; anything else is stored by aiida-core, in the same transaction.
        """
        if self.metadata.store_provenance is False:  # type: ignore[attr-defined]
            return
        node = self.node
        link_type = LinkType.CREATE if isinstance(node, orm.CalculationNode) else LinkType.RETURN
        linked = _output_link_labels(node)
        created: dict[str, orm.Data] = {}
        returned: list[dict[str, t.Any]] = []
        others: list[tuple[str, orm.Data, bool]] = []  # (label, output, plain): stored by aiida-core
        for label, output in self._flat_outputs().items():  # type: ignore[attr-defined]
            if label in linked:
                continue
            if _is_plain_output(output, link_type):
                validate_link_label(label)
                if link_type is LinkType.CREATE:
                    node.base.links.validate_outgoing(output, link_type, label)
                # A RETURN link: ``WorkflowNode.validate_outgoing`` checks that the node is stored, as
                # ``_is_plain_output`` did, without reading the node back from the database.
                if link_type is LinkType.CREATE and can_bulk_store(output):
                    created[label] = output
                elif link_type is LinkType.CREATE:
                    others.append((label, output, True))
                else:
                    returned.append(
                        {
                            'input_id': stored_pk(node),
                            'output_id': stored_pk(output),
                            'label': label,
                            'type': link_type.value,
                        }
                    )
            else:
                others.append((label, output, False))
            linked.add(label)
        if not (created or returned or others):
            return
        rows = _bulk_rows(node, created) if created else []  # validated, cleaned, hashed: before the write lock
        backend = node.backend
        with write_transaction(backend):
            stored = _bulk_insert(node, created, rows) if created else {}
            for label, output, plain in others:
                if plain:
                    output.base.links.incoming_cache.append(LinkTriple(node, link_type, label))
                else:
                    output.base.links.add_incoming(node, link_type, label)
                output.store()
            if returned:
                backend.bulk_insert(EntityTypes.LINK, returned)
            _add_to_autogroup(backend, stored.values())
        if created:
            _replace_nodes(self._outputs, {id(created[label]): stored[label] for label in created})  # type: ignore[attr-defined]


@contextlib.contextmanager
def write_transaction(backend: t.Any) -> Iterator[None]:
    """A storage transaction that, on SQLite, holds the write lock from its first statement; joins one already open.

    aiida-core's ``transaction()`` begins on SQLite with a deferred ``SAVEPOINT``: its first read takes a read lock,
    and its first write must turn it into the write lock. If another connection (another daemon worker) holds the write
    lock then, SQLite refuses at once ("database is locked"), without the busy timeout's wait, because waiting with a
    read lock could deadlock. Here the transaction starts with ``BEGIN IMMEDIATE``, which waits for the write lock as
    long as the connection's busy timeout allows (aiida-core's engine keeps Python's default, 5 s), the way each
    ``Node.store`` outside a transaction starts with its ``INSERT``. Keep such transactions short: other workers wait
    for them. On other databases (PostgreSQL), or inside a transaction, it is ``transaction()`` as aiida-core opens it.
    If the body raises, the transaction is rolled back and the lock released.
    """
    if backend.in_transaction:
        yield
        return
    session = _sqlite_session(backend)
    began = False
    if session is not None:
        connection = session.connection()
        if not connection.connection.dbapi_connection.in_transaction:
            connection.exec_driver_sql('BEGIN IMMEDIATE')
            began = True
    try:
        with backend.transaction():
            yield
    except BaseException:
        if began:
            session.rollback()  # aiida-core's nested transaction leaves the outer one open after a failure
        raise


def _sqlite_session(backend: t.Any) -> t.Any:
    """The SQLAlchemy session of ``backend`` if its database is SQLite (``core.sqlite_dos``), else ``None``."""
    get_session = getattr(backend, 'get_session', None)
    if get_session is None:
        return None
    session = get_session()
    bind = session.get_bind()
    return session if bind.dialect.name == 'sqlite' else None


def bulk_store(creator: orm.CalculationNode, outputs: Mapping[str, orm.Data]) -> dict[str, orm.Data]:
    """Store new nodes created by ``creator``, with their ``CREATE`` links, in one bulk insert; return them stored.

    Each node is validated, cleaned and hashed as :meth:`aiida.orm.Node.store` does it and gets the same database
    row (attributes, extras with the hash, repository metadata) and autogroup; the links are those ``update_outputs``
    would add. Storing the 1752 clusters of the reference study one by one took 6 s, mostly flushes and commits per
    node. The rows are prepared first; the inserts run in one :func:`write_transaction`.

    The returned nodes, loaded in one query per thousand, are the stored nodes; the objects given stay as they were,
    unstored, and must not be stored again (their UUIDs are taken). :class:`BulkLinks` puts the stored nodes in the
    place of the objects among the process's outputs, so the caller of a process gets stored nodes.

    :param creator: the stored calculation node that creates the nodes.
    :param outputs: link label -> new node without files in its repository, of a class that stores itself the plain
        way (:func:`can_bulk_store`).
    :raises ValueError: if the creator is not a stored calculation, a label is no valid link label, a node cannot be
        bulk stored or is given twice (a node has one creator), or as ``Node.store`` raises.
    """
    rows = _bulk_rows(creator, outputs)
    backend = creator.backend
    with write_transaction(backend):
        result = _bulk_insert(creator, outputs, rows)
        _add_to_autogroup(backend, result.values())
    return result


def _bulk_rows(creator: orm.CalculationNode, outputs: Mapping[str, orm.Data]) -> list[dict[str, t.Any]]:
    """Check what :func:`bulk_store` is given and return the database rows of the nodes, as ``Node.store`` makes
    them (validated, cleaned, hashed); nothing is written but the nodes' empty repository metadata."""
    from aiida.common.exceptions import HashingError
    from aiida.common.hashing import make_hash

    if not isinstance(creator, orm.CalculationNode) or not is_stored(creator):
        raise ValueError(f'the creator of bulk stored nodes must be a stored calculation node, got {creator!r}')
    labels_of: dict[int, list[str]] = {}
    for label, output in outputs.items():
        validate_link_label(label)
        if not can_bulk_store(output):
            raise ValueError(
                f'{output!r} (output `{label}`) cannot be bulk stored: it is stored, has links or files, or its class '
                'stores itself its own way; store it with `Node.store`'
            )
        labels_of.setdefault(id(output), []).append(label)
        if len(labels_of[id(output)]) > 1:
            raise ValueError(
                f'node<{output.uuid}> already has an incoming LinkType.CREATE link: {creator} returns it as '
                f'{" and ".join(labels_of[id(output)])}, but a node has only one creator'
            )
    rows = []
    for output in outputs.values():
        output._validate_storability()
        output._validate()
        output.backend_entity.clean_values()
        output.base.repository._store()  # a node without files: the empty repository metadata, no copy
        try:
            node_hash = make_hash(output.base.caching.get_objects_to_hash())
        except HashingError:
            output.logger.exception('Node hashing failed')
            node_hash = None
        computer = output.computer
        rows.append(
            {
                'uuid': output.uuid,
                'node_type': output.node_type,
                'process_type': output.process_type,
                'label': output.label,
                'description': output.description,
                'ctime': output.ctime,
                'mtime': output.mtime,
                'user_id': output.user.pk,
                'dbcomputer_id': None if computer is None else computer.pk,
                'attributes': output.base.attributes.all,
                'extras': {**output.base.extras.all, output.base.caching._HASH_EXTRA_KEY: node_hash},
                'repository_metadata': output.base.repository.metadata,
            }
        )
    return rows


def _bulk_insert(
    creator: orm.CalculationNode, outputs: Mapping[str, orm.Data], rows: list[dict[str, t.Any]]
) -> dict[str, orm.Data]:
    """Insert the prepared ``rows`` and the ``CREATE`` links; return label -> stored node. Call in a transaction."""
    backend = creator.backend
    backend.bulk_insert(EntityTypes.NODE, rows)
    stored = dict(rows_where('uuid', [row['uuid'] for row in rows], ['uuid', '*'], backend=backend))
    backend.bulk_insert(
        EntityTypes.LINK,
        [
            {'input_id': stored_pk(creator), 'output_id': stored[output.uuid].pk, 'label': label, 'type': 'create'}
            for label, output in outputs.items()
        ],
    )
    return {label: stored[output.uuid] for label, output in outputs.items()}


def _add_to_autogroup(backend: t.Any, nodes: t.Iterable[orm.Node]) -> None:
    """Put the nodes in the autogroup of ``verdi run --auto-group`` by their own type, as ``Node.store`` does."""
    grouped = [node for node in nodes if backend.autogroup.is_to_be_grouped(node)]
    if grouped:
        backend.autogroup.get_or_create_group().add_nodes(grouped)


def _output_link_labels(node: orm.ProcessNode) -> set[str]:
    """Labels of the CREATE and RETURN links of ``node`` in the database (labels only: no node is loaded)."""
    if not is_stored(node):
        return set()
    builder = orm.QueryBuilder(backend=node.backend)
    builder.append(orm.ProcessNode, filters={'id': stored_pk(node)}, tag='process')
    builder.append(
        orm.Node,
        with_incoming='process',
        edge_filters={'type': {'in': [LinkType.CREATE.value, LinkType.RETURN.value]}},
        edge_project='label',
    )
    return set(builder.all(flat=True))


def can_bulk_store(output: orm.Data) -> bool:
    """Whether :func:`bulk_store` can store ``output``: a new ``Data`` node stored the plain way (its class does not
    change how a node is stored), with no files in its repository and no links yet."""
    cls = type(output)
    return (
        isinstance(output, orm.Data)
        and not is_stored(output)
        and cls.store is orm.Node.store
        and cls._store is orm.Node._store
        and not output.base.links.incoming_cache
        and not output.base.repository.list_object_names()
    )


def _replace_nodes(outputs: t.MutableMapping[str, t.Any], replacements: dict[int, orm.Node]) -> None:
    """Replace, in the nested output namespaces, each node whose ``id`` is a key of ``replacements``."""
    for key, value in outputs.items():
        if id(value) in replacements:
            outputs[key] = replacements[id(value)]
        elif isinstance(value, t.MutableMapping):
            _replace_nodes(value, replacements)


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
    if not isinstance(output, orm.Data):
        return False
    if link_type is LinkType.CREATE:
        return not is_stored(output) and not any(
            triple.link_type is LinkType.CREATE for triple in output.base.links.incoming_cache
        )
    return is_stored(output)


def calcfunction(function: F) -> F:
    """:func:`aiida.engine.calcfunction` whose process links its inputs and outputs with :class:`BulkLinks`.

    The node, its links and its hash are exactly those of a plain calcfunction; only the link bookkeeping is faster.
    """
    decorated = engine.calcfunction(function)
    process_class = decorated.process_class  # type: ignore[attr-defined]
    process_class.__bases__ = (BulkLinks, *process_class.__bases__)
    return decorated  # type: ignore[no-any-return]
