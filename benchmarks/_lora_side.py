"""One side of benchmarks/lora.py: the default recipe through examples/countdown.py, then this
process's peak resident memory (VmHWM) as a last line `PEAK_RSS_BYTES n`. Run in its own process."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


if __name__ == "__main__":
    sys.argv = [str(ROOT / "examples" / "countdown.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    print(f"PEAK_RSS_BYTES {peak_rss_bytes()}", flush=True)
