# Sourced by scripts/run and scripts/test: make sure a virtualenv with the project
# installed exists, then activate it. OUTBOX_VENV picks another location than ./.venv.

ensure_venv() {
    local extra="$1"
    local venv="${OUTBOX_VENV:-.venv}"
    local python="${PYTHON:-python3}"
    if [ ! -x "$venv/bin/python" ]; then
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "celery-outbox needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
            exit 1
        fi
        echo "creating virtualenv in $venv" >&2
        "$python" -m venv "$venv"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    local stamp="$venv/.celery-outbox-$extra"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing celery-outbox[$extra] into $venv" >&2
        python -m pip install --quiet --upgrade pip
        python -m pip install --quiet --editable ".[$extra]"
        touch "$stamp"
        # The dev extra includes everything the demo needs.
        if [ "$extra" = dev ]; then touch "$venv/.celery-outbox-demo"; fi
    fi
}
