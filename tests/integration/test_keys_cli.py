"""``qntx keys allow`` and ``keys server`` take every valid Z85 public key, including the
ones that begin with "-" or other punctuation, as an argument, with ``--key`` or from a
file or standard input; a bad key is one line naming what is wrong, exit 2."""

from __future__ import annotations

import json
import struct

import pytest
import zmq.utils.z85

from qntx.bus.security import Z85_ALPHABET

from .conftest import Bus


def key_starting_with(char: str, fill: int) -> str:
    """A valid 40-character key whose first character is ``char``: the first 4-byte group's
    value picks its first Z85 digit, the rest is a fixed pattern (no chance involved)."""
    first = Z85_ALPHABET.index(char) * 85**4
    raw = struct.pack(">I", first) + bytes((fill + i) % 256 for i in range(28))
    key = zmq.utils.z85.encode(raw).decode()
    assert key[0] == char and len(key) == 40
    return key


# Every punctuation character a key can begin with (the first group's value must fit 32 bits).
LEADING = [c for c in Z85_ALPHABET[62:] if Z85_ALPHABET.index(c) * 85**4 < 2**32]


def test_every_leading_punctuation_is_reachable():
    assert "-" in LEADING and "." in LEADING and "+" in LEADING and len(LEADING) >= 20


@pytest.fixture
def cli(home):
    bus = Bus(home)
    assert bus.run("keys").returncode == 0
    return bus


def authorized(bus: Bus) -> dict:
    return json.loads((bus.home / "keys" / "authorized.json").read_text())


def test_keys_beginning_with_each_punctuation_character_are_allowed(cli):
    # one process per way of passing, every leading character in each, checked in the file
    for n, char in enumerate(LEADING):
        key = key_starting_with(char, n)
        done = cli.run("keys", "allow", f"arg-{n}", key, "--role", "worker")
        assert done.returncode == 0, (char, done.stderr)
    entries = authorized(cli)
    for n, char in enumerate(LEADING):
        assert entries[f"arg-{n}"]["key"] == key_starting_with(char, n)
        assert entries[f"arg-{n}"]["roles"] == ["worker"]


def test_key_as_option_from_file_and_from_stdin(cli, home):
    dash = key_starting_with("-", 1)
    done = cli.run("keys", "allow", "opt", "--key", dash, "--role", "client")
    assert done.returncode == 0, done.stderr
    quoted = key_starting_with("-", 2)
    done = cli.run("keys", "allow", "stdin", "--from", "-", "--role", "plugin", input=f"'{quoted}'\n")
    assert done.returncode == 0, done.stderr
    path = home / "peer.key"
    plain = key_starting_with(".", 3)
    path.write_text(plain + "\n")
    assert cli.run("keys", "allow", "file", "--from", str(path), "--role", "worker").returncode == 0
    certificate = home / "cert.key"  # a host.key file copied from the other host
    cert_key = key_starting_with("+", 4)
    certificate.write_text(f'metadata\ncurve\n    public-key = "{cert_key}"\n')
    assert cli.run("keys", "allow", "cert", "--from", str(certificate), "--role", "worker").returncode == 0
    entries = authorized(cli)
    assert entries["opt"]["key"] == dash
    assert entries["stdin"]["key"] == quoted
    assert entries["file"]["key"] == plain
    assert entries["cert"]["key"] == cert_key


def test_keys_server_takes_a_leading_dash(cli, home):
    key = key_starting_with("-", 5)
    done = cli.run("keys", "server", key)
    assert done.returncode == 0, done.stderr
    assert f'public-key = "{key}"' in (home / "keys" / "server.key").read_text()
    other = key_starting_with("-", 6)
    assert cli.run("keys", "server", "--from", "-", input=other).returncode == 0
    assert f'public-key = "{other}"' in (home / "keys" / "server.key").read_text()


def test_show_output_pastes_back(cli):
    shown = cli.run("keys", "show").stdout.strip()
    other_home = Bus(cli.home / "other")
    assert other_home.run("keys").returncode == 0
    done = other_home.run("keys", "allow", "first", shown, "--role", "client")
    assert done.returncode == 0, done.stderr
    assert authorized(other_home)["first"]["key"] == shown.strip("'")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("abc", "3 characters long"),
        (key_starting_with("-", 7) + "x", "41 characters long"),
        (key_starting_with("-", 8)[:-1] + "~", "outside Z85: '~'"),
        ("#" * 40, "out of range"),
        ("''", "empty"),
    ],
)
def test_bad_keys_are_one_line(cli, key, says):
    done = cli.run("keys", "allow", "bad", key, "--role", "worker")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "bad" not in authorized(cli)


def test_key_given_twice_or_not_at_all(cli):
    key = key_starting_with("-", 9)
    for argv in (("keys", "allow", "x", key, "--key", key, "--role", "worker"), ("keys", "allow", "x", "--role", "worker")):
        done = cli.run(*argv)
        assert done.returncode == 2 and "give the public key once" in done.stderr, done.stderr
