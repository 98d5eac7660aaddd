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
# The real Qwen2.5 vocabulary, for the test that checks the template crops against the official
# token counts: dashscope's wheel carries it as qwen.tiktoken (only that file is extracted).
if [ ! -f .venv/share/qwen.tiktoken ]; then
    mkdir -p .venv/share
    download=$(mktemp -d)
    python -m pip download -q --no-deps -d "$download" "dashscope==2.0.2"
    python -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/dashscope-*.whl')[0]); \
open('.venv/share/qwen.tiktoken', 'wb').write(z.read('dashscope/resources/qwen.tiktoken'))" "$download"
    rm -rf "$download"
fi
# Debian's chromium and its driver, for the web UI's browser test (tests/test_gui.py skips, saying
# so, where they cannot be installed: not root, or no apt)
if ! command -v chromedriver > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    (apt-get update -q > /dev/null 2>&1 || true)
    apt-get install -y -q chromium chromium-driver > /dev/null 2>&1 || echo "note: chromium could not be installed; the browser test will be skipped"
fi
