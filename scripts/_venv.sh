# Sourced by the scripts: make .venv with a Python >= 3.11 and install the project into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "scoped-resources needs Python 3.11 or newer on PATH (or PYTHON=/path/to/python)" >&2
    return 1
}

ensure_venv() {  # $1: the extras, e.g. "dev,service"; $2: the venv (.venv); $3: its Python
    local extras="$1" venv="${2:-.venv}" python="${3:-}" stamp
    if [ ! -x "$venv/bin/python" ]; then
        "${python:-$(pick_python)}" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
    fi
    # Reinstall only when pyproject.toml or the extras changed.
    stamp="$venv/.installed-$(echo "$extras" | tr ',' '-')"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
        touch "$stamp"
    fi
}
