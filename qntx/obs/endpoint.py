"""One Prometheus scrape for the whole bus: ``qntx up`` serves it on ``metrics``
(``qntx ui`` at ``/metrics`` too).

The actors are separate processes, so each writes its own families to
``<home>/run/metrics/<pid>.prom`` (``qntx.obs.metrics``) and a scrape merges the
files of the actors ``qntx up`` runs now (``<home>/run/actors``), each sample
labelled with its ``actor``. Every actor's process CPU and RSS are read here from
/proc, so workers and the plugin need no exporter of their own. A restarted actor
starts its counters at zero under its new pid, which Prometheus reads as a reset.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from qntx.errors import Invalid
from qntx.obs.metrics import metrics_dir
from qntx.settings import Settings
from qntx.supervisor import supervised_actors

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one) -> (host, port), or a clear error."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise Invalid(f"metrics must be HOST:PORT (e.g. 127.0.0.1:9464) or empty for none, got {text!r}")
    return host, int(port)


def process_figures(pid: int) -> tuple[float, int] | None:
    """(CPU seconds used, resident bytes) of one process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS, int(statm.split()[1]) * PAGE


class BusCollector:
    """The merged families of every supervised actor of one home."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        cpu = CounterMetricFamily("qntx_process_cpu_seconds", "CPU time each actor's process used.", labels=["actor"])
        rss = GaugeMetricFamily("qntx_process_resident_memory_bytes", "Each actor's resident memory.", labels=["actor"])
        up = GaugeMetricFamily("qntx_actor_up", "Actors qntx up runs now (1 each).", labels=["actor"])
        merged: dict[str, Metric] = {}
        directory = metrics_dir(self.settings.run_dir)
        for name, pid in sorted(supervised_actors(self.settings).items()):
            figures = process_figures(pid)
            if figures is None:
                continue
            up.add_metric([name], 1)
            cpu.add_metric([name], figures[0])
            rss.add_metric([name], figures[1])
            try:
                text = (directory / f"{pid}.prom").read_text()
            except OSError:
                continue  # an actor without figures of its own (a worker, the plugin)
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    into.add_sample(sample.name, {"actor": name, **sample.labels}, sample.value)
        yield up
        yield cpu
        yield rss
        yield from merged.values()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def served(settings: Settings) -> bool:
    """Whether ``qntx up`` runs on this home with its metrics on (and this host sees it)."""
    return not settings.connect and metrics_dir(settings.run_dir).is_dir()


def render(settings: Settings) -> bytes:
    """The exposition text of one scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BusCollector(settings))
    return generate_latest(registry)


class MetricsEndpoint:
    """``qntx up``'s side: the directory the actors write into, and the HTTP listener."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.directory = metrics_dir(settings.run_dir)
        self.address_file = settings.run_dir / "metrics.address"
        self.server: Any = None

    def prepare(self) -> None:
        """Before the actors start: a fresh directory when metrics are on, none when off."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.address_file.unlink(missing_ok=True)
        if self.settings.metrics:
            parse_address(self.settings.metrics)  # a bad address fails before anything starts
            self.directory.mkdir(mode=0o700)

    def start(self) -> None:
        if not self.settings.metrics:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_address(self.settings.metrics)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BusCollector(self.settings))
        try:
            self.server, _ = start_http_server(port, host, registry)
        except OSError as exc:  # the port is taken: the bus runs, without the endpoint
            logger.warning("metrics: cannot listen on {}: {}; running without it", self.settings.metrics, exc.strerror)
            return
        bound = f"{host}:{self.server.server_port}"
        self.address_file.write_text(bound + "\n")
        logger.info("metrics on http://{}/metrics", bound)

    def forget(self, pid: int) -> None:
        """An actor's process ended: its file goes (its successor writes its own)."""
        (self.directory / f"{pid}.prom").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.address_file.unlink(missing_ok=True)
