"""A pydantic base for records held by the thousand: one fields-set per class instead of one per instance.

pydantic keeps, on every instance, the set of fields the caller passed (``model_fields_set``). Once
five or more fields are given that set is 728 bytes, more than the instance's own fields: a
100,000-task run held two per task (its ``TaskDef`` and ``TaskRecord``) and two more per history
event. Nothing reads it for these models (no ``exclude_unset`` dumps), so every instance of a class
shares one set naming all of its fields, as if each had been given every field. Assigning a field
adds a name the set already has, so the shared set never grows. ``Spec`` keeps its own: whether
``expect`` was given is part of its meaning.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel

__all__ = ("SharedFieldsSet",)

_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


class SharedFieldsSet(BaseModel):
    """Base for models whose ``model_fields_set`` is every field, shared by all instances of the class."""

    def model_post_init(self, context: Any, /) -> None:
        cls = type(self)
        shared = _ALL_FIELDS.get(cls)
        if shared is None:
            shared = _ALL_FIELDS[cls] = set(cls.model_fields)
        object.__setattr__(self, "__pydantic_fields_set__", shared)

    def __copy__(self) -> Self:
        """What ``model_copy`` makes, sharing the fields-set: pydantic's copy gives it a set of its own (728 bytes
        a copy of a record) and takes twice as long (the engine copies an attempt twice a task)."""
        # None of these models keeps extra fields or private attributes; one that did gets pydantic's copy of them.
        if self.__pydantic_extra__ is not None or self.__pydantic_private__ is not None:
            copied = super().__copy__()
            object.__setattr__(copied, "__pydantic_fields_set__", self.__pydantic_fields_set__)
            return copied
        cls = type(self)
        copied = cls.__new__(cls)
        object.__setattr__(copied, "__dict__", self.__dict__.copy())
        object.__setattr__(copied, "__pydantic_fields_set__", self.__pydantic_fields_set__)
        object.__setattr__(copied, "__pydantic_extra__", None)
        object.__setattr__(copied, "__pydantic_private__", None)
        return copied
