"""The blocking and the asyncio API are one API: every public call of ``Bus`` is on
``AsyncBus`` (and of ``JobHandle`` on ``AsyncJobHandle``) with the same parameters
and defaults, as a coroutine (an async generator where the blocking one yields).
Compared by introspection, so a call added, removed or changed on one side only
fails here."""

from __future__ import annotations

import inspect

import pytest

from qntx.aio import AsyncBus, AsyncJobHandle
from qntx.api import Bus, JobHandle
from qntx.calls import CALLS
from qntx.calls.derive import with_calls

pytestmark = pytest.mark.timeout(30)

PAIRS = [(Bus, AsyncBus), (JobHandle, AsyncJobHandle)]
# The context-manager protocol is the one place the two spell differently.
CONTEXT = {"__enter__": "__aenter__", "__exit__": "__aexit__"}


def public(cls: type) -> dict[str, object]:
    return {name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")}


def parameters(fn) -> list[tuple]:
    """What a caller sees of a function: each parameter's name, kind, default and type."""
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(fn).parameters.values()]


def kind(fn) -> str:
    if inspect.isasyncgenfunction(fn):
        return "async generator"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "plain"


AWAITABLE = {"plain": "coroutine", "generator": "async generator"}


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=lambda c: c.__name__)
def test_same_public_names(sync: type, aio: type) -> None:
    sync_names, aio_names = set(public(sync)), set(public(aio))
    assert sync_names - aio_names == set(), f"only on {sync.__name__}"
    assert aio_names - sync_names == set(), f"only on {aio.__name__}"


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=lambda c: c.__name__)
def test_same_signatures_and_defaults_awaitable_on_async(sync: type, aio: type) -> None:
    sync_members, aio_members = public(sync), public(aio)
    checked = 0
    for name, member in sync_members.items():
        other = aio_members[name]
        if isinstance(member, property):
            assert isinstance(other, property), f"{name}: a property on {sync.__name__} only"
            continue
        assert callable(member) and callable(other), name
        assert parameters(member) == parameters(other), f"{name}: parameters differ"
        assert kind(other) == AWAITABLE[kind(member)], f"{aio.__name__}.{name} is a {kind(other)}"
        checked += 1
    assert checked >= (30 if sync is Bus else 4)  # (the comparison ran over the calls)


def test_context_managers_pair_up() -> None:
    for enter, aenter in CONTEXT.items():
        assert hasattr(Bus, enter) and hasattr(AsyncBus, aenter)
        assert parameters(getattr(Bus, enter)) == parameters(getattr(AsyncBus, aenter))
        assert inspect.iscoroutinefunction(getattr(AsyncBus, aenter))


def test_every_call_of_the_table_is_on_both_with_its_own_signature() -> None:
    for name, fn in CALLS.items():
        for cls in (Bus, AsyncBus):
            method = cls.__dict__[name]  # derived onto the class itself
            assert parameters(method) == parameters(fn), f"{cls.__name__}.{name}"
            assert method.__doc__ == fn.__doc__


def test_a_misspelt_argument_is_a_type_error_at_the_call() -> None:
    bus, abus = object.__new__(Bus), object.__new__(AsyncBus)  # never connected: the call binds first
    with pytest.raises(TypeError, match="prioriti"):
        bus.submit("builtin.echo", 1, prioriti=3)
    with pytest.raises(TypeError, match="prioriti"):
        abus.submit("builtin.echo", 1, prioriti=3)  # (not awaited: raised by the call itself)
    with pytest.raises(TypeError, match="limt"):
        abus.jobs(limt=5000)


def test_a_driver_cannot_write_a_call_by_hand() -> None:
    with pytest.raises(TypeError, match="derived"):

        @with_calls(asynchronous=True)
        class Twin:
            async def jobs(self, status=None, limit=1000):  # a hand-kept twin with its own default
                return []
