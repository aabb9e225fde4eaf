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


def get(model: type[M], pk: Any, *, lock: bool = False) -> M | None:
    """The row with this primary key as a model instance (as the ORM reads it), or None;
    ``lock``: with its row lock (``FOR UPDATE``, where the database has row locks)."""
    select, names, converters = _reader(model)
    suffix = " FOR UPDATE" if lock and connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(f"{select}{suffix}", [pk])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for i, column, convert in converters:
        values[i] = convert(values[i], column, connection)
    return model.from_db(connection.alias, names, values)


_readers: dict[tuple[str, type[Model]], tuple[str, list[str], list[tuple[int, Any, Any]]]] = {}


def _reader(model: type[Model]) -> tuple[str, list[str], list[tuple[int, Any, Any]]]:
    """The ``SELECT`` by primary key of ``model``, its fields' attribute names and the
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
        select = (
            f"SELECT {', '.join(quote(str(f.column)) for f in fields)} FROM {quote(meta.db_table)} "
            f"WHERE {quote(str(meta.pk.column))} = %s"
        )
        _readers[key] = (select, [f.attname for f in fields], converters)
    return _readers[key]
