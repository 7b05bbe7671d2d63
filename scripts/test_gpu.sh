#!/usr/bin/env bash
# The GPU check (README: "Running on GPUs"): every test marked `gpu`, in at most 8 minutes, then a
# table of what passed. Runs with the machine's own Python and PyTorch (a stock PyTorch GPU image);
# no model hub. DeepSpeed and its small dependencies come from wheels/gpu/ (scripts/gpu_wheels.sh)
# when the image lacks them. Without CUDA every test is skipped, with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if ! "$python" -c "import deepspeed" >/dev/null 2>&1; then
    if [ ! -d wheels/gpu ]; then
        echo "[test-gpu] DeepSpeed is not installed and wheels/gpu/ is missing: run scripts/gpu_wheels.sh" \
             "(make gpu-wheels) on a machine with the package registry and bring wheels/gpu/ here" >&2
        exit 2
    fi
    "$python" -m pip install --disable-pip-version-check -q --no-index --find-links wheels/gpu deepspeed
fi
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
report=$(mktemp -d)/gpu.xml
set +e
# SIGINT at the limit, not SIGKILL: pytest stops as after Ctrl-C and still writes the report of the
# tests that ran, so a run cut by the limit still prints its table (KILL 30 s later if it hangs).
timeout -s INT -k 30 "${GPU_TEST_TIMEOUT:-480}" "$python" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider \
    --junitxml="$report" "$@"
rc=$?
set -e
"$python" - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (FileNotFoundError, ET.ParseError):
    sys.exit("[test-gpu] no report: the run was killed (8-minute limit?)")
print(f"\n{'test':<78} {'result':<8} {'seconds':>8}  note")
for case in cases:
    outcome, note = "passed", ""
    for kind in ("failure", "error", "skipped"):
        found = case.find(kind)
        if found is not None:
            outcome, note = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind], (found.get("message") or "")[:70]
    print(f"{case.get('name'):<78} {outcome:<8} {float(case.get('time', 0)):>8.1f}  {note}")
PY
exit $rc
