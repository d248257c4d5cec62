"""Given / when / then for deciders: given(mod, *events).when(cmd).then(*events)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any, TypeVar

import pytest

from app.domain.errors import DomainError

T = TypeVar("T")


def recorded(event_type: type[T], command: Any, **more: Any) -> T:
    """``event_type`` holding ``command``'s fields as they are, and ``more``: the
    event a command is recorded as when it keeps the command's own values."""
    fields = {f.name: getattr(command, f.name) for f in dataclasses.fields(command)}
    return event_type(**(fields | more))


def given(module: ModuleType, *events: Any) -> Given:
    """History for one aggregate: ``events`` folded from ``module.initial_state()``."""
    return Given(module=module, events=events)


@dataclass(frozen=True, slots=True)
class Given:
    module: ModuleType
    events: tuple[Any, ...]

    def state(self) -> Any:
        state = self.module.initial_state()
        for event in self.events:
            state = self.module.evolve(state, event)
        return state

    def when(self, command: Any) -> When:
        return When(module=self.module, state=self.state(), command=command)


@dataclass(frozen=True, slots=True)
class When:
    module: ModuleType
    state: Any
    command: Any

    def then(self, *expected: Any) -> Any:
        """Assert the decided events; return the state they lead to."""
        decided = self.module.decide(self.state, self.command)
        assert decided == expected
        # Deciding twice must agree: the application may retry a command.
        assert self.module.decide(self.state, self.command) == decided
        state = self.state
        for event in decided:
            state = self.module.evolve(state, event)
        return state

    def rejects(self, code: str | Enum, field: str | None = None) -> DomainError:
        """Assert ``decide`` refuses with ``code`` (and ``field`` when given)."""
        with pytest.raises(DomainError) as caught:
            self.module.decide(self.state, self.command)
        error = caught.value
        expected = code.value if isinstance(code, Enum) else code
        assert error.code == expected, error.message
        if field is not None:
            assert error.field == field, error.message
        return error


_PRIMITIVES = (str, int, bool, type(None))


def assert_primitive_record(cls: type) -> None:
    """Fail unless ``cls`` is a frozen, keyword-only dataclass of Avro-friendly fields.

    Allowed: str, int, bool, None, nested such records, and tuples of them; never float.
    """
    assert dataclasses.is_dataclass(cls), f"{cls.__name__} is not a dataclass"
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen, f"{cls.__name__} is not frozen"
    assert hasattr(cls, "__slots__"), f"{cls.__name__} has no slots"
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        assert field.kw_only, f"{cls.__name__}.{field.name} is not keyword-only"
        _assert_primitive_type(hints[field.name], f"{cls.__name__}.{field.name}")


def _assert_primitive_type(hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item, ellipsis = typing.get_args(hint)
        assert ellipsis is Ellipsis, f"{where}: use tuple[X, ...]"
        _assert_primitive_type(item, f"{where}[]")
    elif origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            _assert_primitive_type(arg, where)
    elif dataclasses.is_dataclass(hint):
        assert_primitive_record(hint)
    else:
        assert hint in _PRIMITIVES, f"{where}: {hint!r} is not a primitive"
