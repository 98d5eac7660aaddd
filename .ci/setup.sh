# Sourced by .ci/run and .ci/demo: make .venv (once) with a CPU build of torch and the project.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    # The default torch wheel is a multi-GB CUDA build; take a CPU build: the local one if the
    # machine has it (pip finds it through its find-links), else the CPU wheel index.
    cpu_wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$cpu_wheel" ]; then
        version=$(basename "$cpu_wheel" | cut -d- -f2 | cut -d+ -f1)
        python -m pip install -q "torch==$version"
    else
        python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install -q -e ".[test]"
