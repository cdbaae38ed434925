"""The methods of a driver, written from the calls.

Each method is a real ``def`` (``async def`` for the asyncio driver) with the
call's own parameters and defaults, so a misspelt argument is a TypeError at the
call, ``help()`` and ``inspect.signature`` show the parameters, and the
blocking and asyncio APIs cannot differ in what they accept. Its body runs the
call's generator, carrying out each effect it yields with the driver class's
``_effects`` (effect type -> its function of the driver and the effect; awaited
on asyncio).
"""

from __future__ import annotations

import inspect
import linecache
from collections.abc import Callable, Generator

from qntx.calls.effects import CALLS


def _source(name: str, fn: Callable, asynchronous: bool) -> tuple[str, dict]:
    namespace: dict = {"_call": fn}
    params: list[str] = []
    forward: list[str] = []
    starred = False
    parameters = list(inspect.signature(fn).parameters.values())
    for i, p in enumerate(parameters):
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"call {name}: positional-only parameters are not supported")
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            forward.append(f"*{p.name}")
            starred = True
            continue
        if p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}")
            forward.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not starred:
            params.append("*")
            starred = True
        text = p.name
        if p.default is not p.empty:
            namespace[f"_default{i}"] = p.default  # the very object: a default is never copied
            text += f"=_default{i}"
        params.append(text)
        forward.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    bus = parameters[0].name
    if any(p.name.startswith("_") for p in parameters):
        raise TypeError(f"call {name}: a parameter name starting with _ would meet the body's own")
    head = "async def" if asynchronous else "def"
    wait = "await " if asynchronous else ""
    return RUN.format(head=head, name=name, params=", ".join(params), forward=", ".join(forward), bus=bus, wait=wait), namespace


# The driver's loop, in each method (one frame less than a shared runner: the asyncio
# submit is on a hot path). It carries out what the call asks until it returns; an
# error is raised in the call where it asked (the call may handle it).
RUN = """\
{head} {name}({params}):
    _call_ = _call({forward})
    _effects = {bus}._effects
    try:
        _effect = next(_call_)
        while True:
            try:
                _result = {wait}_effects[type(_effect)]({bus}, _effect)
            except Exception as _error:
                _effect = _call_.throw(_error)
            else:
                _effect = _call_.send(_result)
    except StopIteration as _done:
        return _done.value
"""


def method(name: str, fn: Callable[..., Generator], owner: type, *, asynchronous: bool) -> Callable:
    source, namespace = _source(name, fn, asynchronous)
    filename = f"<qntx call {owner.__name__}.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (our own text)
    made = namespace[name]
    made.__doc__ = fn.__doc__
    made.__annotations__ = dict(fn.__annotations__)
    made.__module__ = owner.__module__
    made.__qualname__ = f"{owner.__qualname__}.{name}"
    return made


def with_calls(*, asynchronous: bool) -> Callable[[type], type]:
    """Class decorator: give a driver one method per call (a method the class
    writes itself is an error: it would be a twin)."""

    def decorate(cls: type) -> type:
        for name, fn in CALLS.items():
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__}.{name} is a call: it is derived, not written by hand")
            setattr(cls, name, method(name, fn, cls, asynchronous=asynchronous))
        return cls

    return decorate
