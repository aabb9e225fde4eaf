"""Plain statements for the few writes every message and reply makes (a post, the end of a
reply): the same SQL the ORM would send, without building it each time. Building a query
cost the server and the agents worker more CPU than PostgreSQL spent running it
(docs/PERFORMANCE.md, "Issue 12: message posts"). Everything else uses the ORM."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Model

M = TypeVar("M", bound=Model)


def insert(objects: Sequence[Model]) -> None:
    """Store new rows of one model in one ``INSERT``, every concrete field as the ORM
    would store it (``pre_save``, then ``get_db_prep_save``). For models whose primary
    key is set before saving (Tandem's prefixed ids), since nothing is read back."""
    if not objects:
        return
    meta = type(objects[0])._meta
    fields = meta.concrete_fields
    quote = connection.ops.quote_name
    params: list[Any] = []
    for obj in objects:
        if type(obj)._meta is not meta:
            raise ValueError("insert() takes rows of one model")
        if obj.pk is None:
            raise ValueError(f"insert() needs the primary key of {meta.label} set")
        for field in fields:
            params.append(field.get_db_prep_save(field.pre_save(obj, True), connection))
        obj._state.adding = False
        obj._state.db = connection.alias
    row = f"({', '.join(['%s'] * len(fields))})"
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(str(f.column)) for f in fields)}) "
            f"VALUES {', '.join([row] * len(objects))}",
            params,
        )


def update(model: type[Model], pk: Any, **values: Any) -> int:
    """Set fields of the row with this primary key (as ``filter(pk=pk).update(...)``,
    plain values only); returns the rows changed."""
    meta = model._meta
    quote = connection.ops.quote_name
    assignments, params = [], []
    for name, value in values.items():
        field = meta.get_field(name)
        assignments.append(f"{quote(str(field.column))} = %s")  # type: ignore[union-attr]
        params.append(field.get_db_prep_save(value, connection))  # type: ignore[union-attr]
    params.append(pk)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(meta.db_table)} SET {', '.join(assignments)} WHERE {quote(str(meta.pk.column))} = %s",
            params,
        )
        return int(cursor.rowcount)


def get(model: type[M], pk: Any, *, lock: bool = False) -> M | None:
    """The row with this primary key as a model instance (as the ORM reads it), or None;
    ``lock``: with its row lock (``FOR UPDATE``, where the database has row locks)."""
    found = _select(model, "pk", pk, lock=lock)
    return found[0] if found else None


def children(model: type[M], parent: str, parent_id: Any, order: str) -> list[M]:
    """The rows whose foreign key ``parent`` is ``parent_id``, ordered by the field
    ``order``, as model instances (as the ORM reads them)."""
    return _select(model, parent, parent_id, order=order)


def _select(model: type[M], by: str, value: Any, *, lock: bool = False, order: str = "") -> list[M]:
    select = _reader(model)[0]
    meta = model._meta
    quote = connection.ops.quote_name
    column = meta.pk.column if by == "pk" else meta.get_field(by).column  # type: ignore[union-attr]
    sql = f"{select} WHERE {quote(str(column))} = %s"
    if order:
        sql += f" ORDER BY {quote(str(meta.get_field(order).column))}"  # type: ignore[union-attr]
    if lock and connection.features.has_select_for_update:
        sql += " FOR UPDATE"
    with connection.cursor() as cursor:
        cursor.execute(sql, [value])
        return instances(model, cursor.fetchall())


def columns(model: type[Model]) -> str:
    """``model``'s columns in the order ``instances`` reads them (for a ``RETURNING``)."""
    quote = connection.ops.quote_name
    return ", ".join(quote(str(f.column)) for f in model._meta.concrete_fields)


def instances(model: type[M], rows: Sequence[Sequence[Any]]) -> list[M]:
    """Rows of ``columns(model)`` as model instances (as the ORM reads them)."""
    _, names, converters = _reader(model)
    found = []
    for row in rows:
        values = list(row)
        for i, column, convert in converters:
            values[i] = convert(values[i], column, connection)
        found.append(model.from_db(connection.alias, names, values))
    return found


_readers: dict[tuple[str, type[Model]], tuple[str, list[str], list[tuple[int, Any, Any]]]] = {}


def _reader(model: type[Model]) -> tuple[str, list[str], list[tuple[int, Any, Any]]]:
    """The ``SELECT`` of ``model``'s columns, their fields' attribute names and the
    conversions the ORM applies to what the database returns (dates on SQLite, JSON,
    booleans): worked out once per model and database vendor."""
    key = (connection.vendor, model)
    if key not in _readers:
        meta = model._meta
        fields = meta.concrete_fields
        quote = connection.ops.quote_name
        converters = []
        for i, field in enumerate(fields):
            column = field.get_col(meta.db_table)
            for convert in [*connection.ops.get_db_converters(column), *column.get_db_converters(connection)]:
                converters.append((i, column, convert))
        select = f"SELECT {', '.join(quote(str(f.column)) for f in fields)} FROM {quote(meta.db_table)}"
        _readers[key] = (select, [f.attname for f in fields], converters)
    return _readers[key]
