"""The one place where aiida-mlworkbench touches aiida-core internals: linking processes with thousands of inputs.

Everything else in the package uses aiida-core's public API. This module exists for the processes that consume one
aiida-kkr node per embedding of a database: the cluster extraction
(:func:`~aiida_mlworkbench.calcfunctions.clusters.extract_impurity_clusters`, every ``impurity_info``), the KKR
targets (:func:`~aiida_mlworkbench.calcfunctions.targets.kkr_result_targets`, the ``output_parameters`` of every
KkrimpCalculation run) and the work chains when they are given the embeddings. aiida-core 2.9 validates each new
input link against all links added before it (comparing nodes by value), which makes a process with N inputs cost
O(N^2): minutes for the 1752 embeddings of the reference study.

:class:`ManyInputs` replaces that one step, ``Process._setup_inputs``, for a process with at least
:data:`MANY_INPUTS` inputs: it checks the rules of :func:`aiida.orm.utils.links.validate_link` that can fail for the
input of a new process node (each in constant time: a new, unstored node has no links and no descendants, so label
uniqueness is all that is left to check) and hands aiida-core the complete list of input links at once. The node, its
links and its hash are then stored by aiida-core itself, as for any process.

The module checks itself after every such store (:func:`check_stored_inputs`): the number of input links in the
database equals the number of inputs, and the node's stored hash equals ``compute_hash()``. If aiida-core changed in a
way this module does not know, that check raises :class:`EngineCheckError`, naming the aiida-core version and the
switch: set the environment variable ``MLWORKBENCH_PLAIN_AIIDA=1`` (for daemon workers, in the environment of
``verdi daemon start``) and every process runs on plain aiida-core, slowly but without this module. On an aiida-core
version outside :data:`TESTED_AIIDA_CORE`, the module switches itself off and logs a warning once.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import typing as t

import sqlalchemy
from aiida import __version__ as aiida_core_version
from aiida import engine, orm
from aiida.common.links import LinkType, validate_link_label
from aiida.orm.utils.links import LinkTriple

__all__ = (
    'ENVIRONMENT_VARIABLE',
    'MANY_INPUTS',
    'TESTED_AIIDA_CORE',
    'EngineCheckError',
    'ManyInputs',
    'acceleration_enabled',
    'calcfunction_with_many_inputs',
    'check_stored_inputs',
    'load_together',
)

LOGGER = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = 'MLWORKBENCH_PLAIN_AIIDA'
"""Set to ``1`` (or ``true``, ``yes``) to run every process on plain aiida-core, without this module."""

TESTED_AIIDA_CORE: tuple[tuple[int, int], ...] = ((2, 9),)
"""The aiida-core minor versions this module is tested on; on any other it switches itself off."""

MANY_INPUTS = 200
"""A process with fewer input nodes than this is linked by aiida-core itself: its quadratic cost is negligible."""

LOAD_CHUNK = 5000
"""Node rows read per query by :func:`load_together` (below SQLite's limit of bound parameters)."""

INPUT_LINK_TYPES = (LinkType.INPUT_CALC, LinkType.INPUT_WORK)

F = t.TypeVar('F', bound=t.Callable[..., t.Any])

_WARNED: set[str] = set()  # the untested aiida-core versions warned about


class EngineCheckError(RuntimeError):
    """A process stored by :class:`ManyInputs` is not what plain aiida-core would have stored."""


def _aiida_core_minor() -> tuple[int, int]:
    major, minor = aiida_core_version.split('.')[:2]
    return int(major), int(''.join(char for char in minor if char.isdigit()) or 0)


def acceleration_enabled() -> bool:
    """Whether :class:`ManyInputs` links inputs itself: not switched off, and aiida-core is a tested version."""
    if os.environ.get(ENVIRONMENT_VARIABLE, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return False
    if _aiida_core_minor() not in TESTED_AIIDA_CORE:
        if aiida_core_version not in _WARNED:
            LOGGER.warning(
                'aiida-mlworkbench: aiida-core %s is not among the versions its engine module is tested on (%s); '
                'processes with thousands of inputs run on plain aiida-core, which is slow.',
                aiida_core_version,
                ', '.join(f'{major}.{minor}' for major, minor in TESTED_AIIDA_CORE),
            )
            _WARNED.add(aiida_core_version)
        return False
    return True


def _switch_off_hint() -> str:
    return (
        f'aiida-core {aiida_core_version} does not behave as aiida_mlworkbench.engine expects (tested on '
        f'{", ".join(f"{a}.{b}" for a, b in TESTED_AIIDA_CORE)}). Set the environment variable '
        f'{ENVIRONMENT_VARIABLE}=1 (for the daemon: `{ENVIRONMENT_VARIABLE}=1 verdi daemon restart`) to run on plain '
        'aiida-core, and report this at the aiida-mlworkbench issue tracker.'
    )


def check_stored_inputs(node: orm.ProcessNode, n_inputs: int) -> None:
    """Check that ``node`` was stored with ``n_inputs`` input links and with the hash aiida-core computes.

    :raises EngineCheckError: naming what differs, the aiida-core version and how to switch the module off.
    """
    builder = orm.QueryBuilder(backend=node.backend)
    builder.append(orm.ProcessNode, filters={'id': node.pk}, tag='process')
    builder.append(
        orm.Data, with_outgoing='process', edge_filters={'type': {'in': [t.value for t in INPUT_LINK_TYPES]}}
    )
    stored = builder.count()
    if stored != n_inputs:
        raise EngineCheckError(
            f'{node} has {stored} input links stored, but it was given {n_inputs} inputs. {_switch_off_hint()}'
        )
    with node.backend.transaction():  # read only; no query per input attribute (see :meth:`ManyInputs.on_create`)
        stored_hash = node.base.caching.get_hash()
        computed = node.base.caching.compute_hash()
    if stored_hash != computed:
        raise EngineCheckError(
            f'{node} was stored with the hash {stored_hash}, but its inputs and attributes hash to {computed}: '
            f'caching would match it with the wrong processes. {_switch_off_hint()}'
        )


class ManyInputs:
    """Process mixin: link thousands of inputs in linear time (see the module docstring); first in the bases.

    Below :data:`MANY_INPUTS` inputs, or when :func:`acceleration_enabled` is false, the process is aiida-core's own.
    """

    node: orm.ProcessNode

    def _setup_inputs(self) -> None:
        """Link every input to the new process node, with the rules aiida-core applies to such links."""
        node = self.node
        inputs = [(label, source) for label, source in self._flat_inputs().items() if source is not None]  # type: ignore[attr-defined]
        if len(inputs) < MANY_INPUTS or not acceleration_enabled():
            self.__dict__.pop('_mlworkbench_inputs', None)
            super()._setup_inputs()  # type: ignore[misc]
            return
        link_type = LinkType.INPUT_CALC if isinstance(node, orm.CalculationNode) else LinkType.INPUT_WORK
        if node.is_stored or node.is_sealed:
            raise ValueError(f'{node} is already stored: input links can only be added to a new process node.')
        existing = list(node.base.links.incoming_cache)
        labels = {triple.link_label for triple in existing}
        triples = []
        for label, source in inputs:
            if not isinstance(source, orm.Data):
                raise ValueError(f'cannot add a {link_type} link from {type(source)} to {type(node)}: inputs are Data')
            if source.backend != node.backend:
                raise ValueError(f'input `{label}` is stored in {source.backend}, the process in {node.backend}.')
            try:
                validate_link_label(label)
            except ValueError as exception:
                raise ValueError(f'invalid link label `{label}`: {exception}') from exception
            if label in labels:
                raise ValueError(f'node<{node.uuid}> already has an incoming {link_type} link with label "{label}"')
            source.base.links.validate_outgoing(node, link_type, label)
            labels.add(label)
            triples.append(LinkTriple(source, link_type, label))
        node.base.links.incoming_cache = existing + triples
        earlier_inputs = sum(triple.link_type in INPUT_LINK_TYPES for triple in existing)
        self.__dict__['_mlworkbench_inputs'] = earlier_inputs + len(triples)

    def _many_inputs(self) -> list[orm.Data] | None:
        """The input nodes if this process is one this module handles (many inputs, module on), else ``None``.

        Read from the raw inputs, which exist before aiida-core parses them when the process is created.
        """
        inputs = list(_data_nodes(self.raw_inputs or {}))  # type: ignore[attr-defined]
        if len(inputs) < MANY_INPUTS or not acceleration_enabled():
            return None
        return inputs

    def on_create(self) -> None:
        """Create the process as aiida-core does, then check what :meth:`_setup_inputs` stored.

        The inputs are read back in one query first (:func:`load_together`). aiida-core then stores the node, its
        links and its hash in one transaction, inside which it does not read every attribute of every input from the
        database again while it hashes them; on SQLite that transaction takes the write lock first
        (:func:`_take_write_lock`). A node that fails the check stays in the graph as an excepted, sealed process with
        the check's message, so that it is neither run nor taken as a cache source.
        """
        inputs = self._many_inputs()
        if inputs is None:
            super().on_create()  # type: ignore[misc]
            return
        load_together(inputs)
        with inputs[0].backend.transaction():
            _take_write_lock(inputs[0])
            super().on_create()  # type: ignore[misc]
        n_inputs = self.__dict__.get('_mlworkbench_inputs')
        if n_inputs is None or not self.node.is_stored:
            return
        load_together(inputs)  # the commits of the store made the session forget them again
        try:
            check_stored_inputs(self.node, n_inputs)
        except EngineCheckError as exception:
            self.node.set_exception(f'{type(exception).__name__}: {exception}')
            self.node.set_process_state(engine.ProcessState.EXCEPTED)
            self.node.seal()
            raise

    def encode_input_args(self, inputs: t.Any) -> t.Any:
        """Encode inputs for a checkpoint as aiida-core does, but the process's own inputs only once.

        aiida-core writes the inputs into every checkpoint twice (as given and as parsed), naming each input node by
        its UUID and reading each node back from the database for it: for thousands of inputs, most of the cost of
        every step. The inputs of a process never change, so the encoding of those two frozen mappings is kept and
        reused (made after reading the nodes back in one query); anything else, such as the outputs, is encoded anew.
        """
        own = [known for known in (self.raw_inputs, self.inputs) if known is not None]  # type: ignore[attr-defined]
        nodes = self._many_inputs()
        if nodes is None or not any(inputs is known for known in own):
            return super().encode_input_args(inputs)  # type: ignore[misc]
        encoded = self.__dict__.setdefault('_mlworkbench_encoded', {})
        cached = encoded.get(id(inputs))
        if cached is None or cached[0] is not inputs:
            load_together(nodes)
            cached = encoded[id(inputs)] = (inputs, super().encode_input_args(inputs))  # type: ignore[misc]
        return cached[1]


def _take_write_lock(node: orm.Node) -> None:
    """On SQLite, take the database's write lock now, at the start of the open transaction, waiting for it if need be.

    SQLite locks the whole database for writing. A transaction that reads before it writes holds a read lock when it
    asks for the write lock, and if another connection is writing at that moment, SQLite fails one of the two at once
    with "database is locked" instead of letting it wait (it would be a deadlock). A write that changes no row, as the
    first statement, makes the transaction ask for the write lock before any read, and so wait like any other writer.
    PostgreSQL locks rows: nothing to do there.

    :raises EngineCheckError: if the storage does not expose its SQLAlchemy session and node model.
    """
    try:
        session = node.backend.get_session()  # type: ignore[attr-defined]
        model_class = type(node.backend_entity.bare_model)
        dialect = session.get_bind().dialect.name
    except AttributeError as exception:
        raise EngineCheckError(f'cannot take the write lock: {exception}. {_switch_off_hint()}') from None
    if dialect == 'sqlite':
        session.execute(sqlalchemy.update(model_class).where(sqlalchemy.false()).values(id=model_class.id))


def _data_nodes(inputs: collections.abc.Mapping[str, t.Any]) -> collections.abc.Iterator[orm.Data]:
    for value in inputs.values():
        if isinstance(value, orm.Data):
            yield value
        elif isinstance(value, collections.abc.Mapping):
            yield from _data_nodes(value)


def load_together(nodes: collections.abc.Sequence[orm.Node]) -> None:
    """Read the database rows of the stored ``nodes`` back in a few queries, into the session's existing objects.

    After every commit, aiida-core's session forgets what it read (SQLAlchemy's ``expire_on_commit``), and the next
    access to each node reads its row with a query of its own. This loads the rows of all nodes at once instead. It
    only reads: the objects' state is the database's, as the per-node queries would have made it.

    Does nothing when the module is switched off (:func:`acceleration_enabled`).

    :raises EngineCheckError: if aiida-core's storage no longer exposes what this needs (the session and the
        SQLAlchemy model of a node).
    """
    if not acceleration_enabled():
        return
    by_backend: dict[int, tuple[t.Any, t.Any, list[int]]] = {}
    for node in nodes:
        try:
            model = node.backend_entity.bare_model
            session = node.backend.get_session()  # type: ignore[attr-defined]
            identity = sqlalchemy.inspect(model).identity  # known without a query, also when expired
        except (AttributeError, sqlalchemy.exc.NoInspectionAvailable) as exception:
            raise EngineCheckError(f'cannot read the inputs in one query: {exception}. {_switch_off_hint()}') from None
        if identity is None:  # not stored
            continue
        entry = by_backend.setdefault(id(session), (session, type(model), []))
        entry[2].append(identity[0])
    for session, model_class, ids in by_backend.values():
        for start in range(0, len(ids), LOAD_CHUNK):
            statement = sqlalchemy.select(model_class).where(model_class.id.in_(ids[start : start + LOAD_CHUNK]))
            session.execute(statement).scalars().all()


def calcfunction_with_many_inputs(function: F) -> F:
    """:func:`aiida.engine.calcfunction` whose process links its inputs with :class:`ManyInputs`.

    aiida-core builds the process class of a calcfunction itself and offers no way to give it a base class, so the
    mixin is put in front of the generated class's bases; this is checked, and fails loudly if aiida-core changes.
    """
    decorated = engine.calcfunction(function)
    process_class = decorated.process_class  # type: ignore[attr-defined]
    process_class.__bases__ = (ManyInputs, *process_class.__bases__)
    if process_class.__mro__[1] is not ManyInputs or not issubclass(process_class, engine.Process):
        raise EngineCheckError(
            f'the process class of calcfunction `{function.__name__}` cannot take the ManyInputs mixin. '
            + _switch_off_hint()
        )
    return decorated  # type: ignore[no-any-return]
