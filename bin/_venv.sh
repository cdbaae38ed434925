# Sourced by the bin/ launchers: make sure the repo-local virtual environment
# exists and has the project installed (editable, with its test extras).
# Re-installs when pyproject.toml changes.
QNTX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QNTX_VENV=${QNTX_VENV:-$QNTX_ROOT/.venv}

_qntx_python() {
    for candidate in "${QNTX_PYTHON:-}" python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "qntx: Python 3.11 or newer is required (set QNTX_PYTHON)" >&2
    return 1
}

_qntx_bootstrap() {
    local stamp="$QNTX_VENV/.qntx-installed"
    local want
    want=$(cksum <"$QNTX_ROOT/pyproject.toml")
    if [ -x "$QNTX_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local py
    py=$(_qntx_python) || return 1
    echo "qntx: setting up $QNTX_VENV (first run)..." >&2
    if [ ! -x "$QNTX_VENV/bin/python" ]; then
        "$py" -m venv "$QNTX_VENV" || return 1
    fi
    if ! "$QNTX_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "$QNTX_ROOT[test]" >"$QNTX_VENV/install.log" 2>&1; then
        cat "$QNTX_VENV/install.log" >&2
        echo "qntx: installing the project into $QNTX_VENV failed (log above)" >&2
        return 1
    fi
    echo "$want" >"$stamp"
}

_qntx_bootstrap || exit 1
