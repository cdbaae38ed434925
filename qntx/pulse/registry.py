"""Pulse's registry of handlers: which plugin runs each handler, and which version
of it new jobs pin. No I/O; the one registry on the bus (the server asks it).

Built-in handlers run on plain workers. A plugin announces its handlers when it is
initialised (``PluginUp``) and whenever they change (``HandlersAnnounced``); the first
plugin to announce a handler keeps it. A plugin that goes down keeps its handlers
known (jobs for them wait for it to come back); a handler its plugin no longer
announces is **removed**: its waiting jobs fail.

Each handler has a **route**: the group of worker sessions that take its jobs (``""``:
plain workers, for built-ins; the plugin's name: the sessions that plugin runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN_HANDLERS = ("builtin.echo", "builtin.fail", "builtin.sleep")


@dataclass(slots=True)
class Plugin:
    name: str
    handlers: list[str] = field(default_factory=list)  # in the order it announced them
    up: bool = False


class Registry:
    def __init__(self) -> None:
        self.plugins: dict[str, Plugin] = {}
        self._owner: dict[str, str] = {}  # handler -> the plugin that announced it
        self.names: set[str] = set()  # every plugin that ever registered (on disk)
        self._removed: set[str] = set()  # handlers their plugin deleted
        self._versions: dict[str, str] = {}  # handler -> its current version (pinned by new jobs)
        self.versions_dirty = False

    def restore(self, names, versions: dict[str, str]) -> None:
        self.names = set(names)
        self._versions = dict(versions)

    def route_of(self, handler: str) -> str:
        if handler in BUILTIN_HANDLERS:
            return ""
        return self._owner.get(handler) or handler.split(".", 1)[0]

    def owner_of(self, handler: str) -> str | None:
        return self._owner.get(handler)

    def is_up(self, route: str) -> bool:
        """Whether jobs of ``route`` may go out now (built-ins always may)."""
        if not route:
            return True
        plugin = self.plugins.get(route)
        return plugin is not None and plugin.up

    def known(self, handler: str) -> bool:
        """Whether a job of ``handler`` may be accepted: a built-in, a handler some
        plugin announced, or any handler of a known plugin that is down now (it may
        come back with it; if not, the job fails then)."""
        if handler in BUILTIN_HANDLERS or handler in self._owner:
            return True
        name = handler.split(".", 1)[0]
        plugin = self.plugins.get(name)
        return (plugin is None or not plugin.up) and name in self.names

    def known_handlers(self) -> list[str]:
        return sorted({*BUILTIN_HANDLERS, *self._owner})

    def live_handlers(self) -> list[str]:
        """The handlers that can run now: built-ins and those of the plugins up."""
        return sorted({*BUILTIN_HANDLERS, *(h for p in self.plugins.values() if p.up for h in p.handlers)})

    def handlers_of(self, plugin: str) -> list[str]:
        found = self.plugins.get(plugin)
        return list(found.handlers) if found is not None else []

    def unroutable(self, handler: str) -> bool:
        """Its plugin deleted it, or is up and does not have it: it can never run."""
        if handler in self._removed:
            return True
        if handler in BUILTIN_HANDLERS or handler in self._owner:
            return False
        plugin = self.plugins.get(handler.split(".", 1)[0])
        return plugin is not None and plugin.up

    def version_of(self, handler: str) -> str | None:
        return self._versions.get(handler)

    def set_versions(self, plugin: str, versions: tuple[tuple[str, str], ...]) -> None:
        prefix = plugin + "."
        current = {h: v for h, v in self._versions.items() if not h.startswith(prefix)}
        current.update(versions)
        if current != self._versions:
            self._versions, self.versions_dirty = current, True

    def versions_snapshot(self) -> dict[str, str] | None:
        if not self.versions_dirty:
            return None
        self.versions_dirty = False
        return dict(self._versions)

    def register(self, name: str) -> tuple[Plugin, bool]:
        """The plugin called ``name`` (made if new), and whether its name is new on disk."""
        new = name not in self.names
        self.names.add(name)
        plugin = self.plugins.get(name)
        if plugin is None:
            plugin = self.plugins[name] = Plugin(name)
        return plugin, new

    def announce(self, plugin: Plugin, names: list[str]) -> tuple[list[str], list[str], list[str]]:
        """``plugin`` has these handlers now: (the ones it gets, in its order; those it
        lost; those another plugin owns, ignored)."""
        refused = [n for n in dict.fromkeys(names) if self._owner.get(n, plugin.name) != plugin.name]
        wanted = [
            n for n in dict.fromkeys(names)
            if self._owner.get(n, plugin.name) == plugin.name and n not in BUILTIN_HANDLERS
        ]  # fmt: skip
        lost = [n for n in plugin.handlers if n not in wanted]
        for name in lost:
            del self._owner[name]
        for name in wanted:
            self._owner[name] = plugin.name
        plugin.handlers = wanted
        self._removed -= set(wanted)
        return wanted, lost, refused

    def remove(self, handler: str) -> None:
        self._removed.add(handler)
