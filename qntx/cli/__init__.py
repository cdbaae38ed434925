"""The ``qntx`` command line: a thin layer over the scripting API (``qntx.api``).

Global options (``--home``, ``--debug``, ``--insecure``, ``--connect``) are accepted
anywhere on the line. Every
error becomes one line on stderr and a non-zero exit code (2 for bad input);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

from cyclopts import App, Parameter
from cyclopts.exceptions import CycloptsError

from qntx import __version__
from qntx.errors import QntxError


@dataclass
class Options:
    home: str | None = None
    debug: bool = False
    insecure: bool = False
    connect: str | None = None


options = Options()

app = App(
    name="qntx",
    help="QNTX: attestations, handlers and durable jobs over a ZeroMQ bus.",
    version=__version__,
    exit_on_error=False,
    print_error=False,
    help_on_error=False,
    # Docstrings are shown as written: rendering them as Markdown costs every
    # `--help` the import of a Markdown parser.
    help_format="plaintext",
)


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    home: Annotated[str | None, Parameter(help="QNTX home directory (default $QNTX_HOME or ~/.qntx).")] = None,
    debug: Annotated[bool, Parameter(help="Show tracebacks and debug logs.")] = False,
    insecure: Annotated[bool, Parameter(help="Allow tcp:// endpoints without CURVE encryption.")] = False,
    connect: Annotated[
        str | None,
        Parameter(
            help="Use the bus of another host through its server's address, tcp://HOST:PORT (this home's keys); "
            "several, comma-separated (or a name with a record per server), where a standby may take over."
        ),
    ] = None,
):
    options.home = home
    options.debug = debug
    options.insecure = insecure
    options.connect = connect
    return app(tokens)


def settings(**flags):
    from qntx.settings import load_settings

    if options.insecure:
        flags.setdefault("insecure", True)
    return load_settings(options.home, **flags)


def open_bus(**flags):
    from qntx.api import Bus

    if options.connect:
        flags.setdefault("connect", options.connect)
    return Bus(settings(**flags))


def fail(message: str, code: int = 2) -> None:
    """Stop the command with one error line."""
    raise SystemExit(_error_line(message, code))


def json_option(text: str, option: str) -> Any:
    """The value of a JSON option, strictly: NaN, Infinity and numbers too large for a
    float are refused (JSON has no such numbers: what is stored is printed back as JSON)."""
    import json
    import math

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def finite(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            raise ValueError(f"{digits} is too large for a number")
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite)
    except ValueError as exc:  # (json.JSONDecodeError too)
        fail(f"{option} is not valid JSON: {exc}")


def _error_line(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from qntx.cli import attestations, db, jobs, keys, run, schedules, ui  # noqa: F401  (registers commands)

    os.umask(0o077)  # whatever a qntx process creates (keys, data, logs) is its owner's alone

    try:
        result = app.meta(sys.argv[1:] if argv is None else argv)
    except CycloptsError as exc:
        text = str(exc).strip().splitlines()
        return _error_line(text[0] if text else "invalid command line", 2)
    except QntxError as exc:
        if options.debug:
            raise
        return _error_line(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OverflowError as exc:  # a number too large for the wire or the store
        return _error_line(f"a number is out of range: {exc}", 2)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except UnicodeError as exc:  # text with a lone surrogate (bytes in another encoding) where UTF-8 must go
        if options.debug:
            raise
        return _error_line(f"text that is not valid UTF-8 ({exc.reason}); give it as UTF-8", 2)
    except OSError as exc:  # the machine said no (a path that is a file, no permission, a full disk)
        if options.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        return _error_line(f"{exc.strerror or exc}{where}", 1)
    except Exception as exc:  # a bug: still one line unless --debug
        if options.debug:
            raise
        return _error_line(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)", 1)
    return result if isinstance(result, int) else 0
