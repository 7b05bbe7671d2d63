"""Peak memory of token_logprobs vs the naive log_softmax + gather, at Qwen2.5's vocabulary.

    .venv/bin/python benchmarks/logprobs_memory.py [--batch 8 --length 512 --vocab 151936]

Each path runs in a fresh child process. The peak is the process's resident-set high-water mark
(VmHWM in /proc/self/status, reset through /proc/self/clear_refs just before the call), minus the
resident size before the call, so it counts only what the call adds on top of the logits.
Linux only. Prints both peaks, their ratio, and the largest difference between the two results.
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from minigrpo.algo import token_logprobs

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

b, t, v, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
logits = torch.randn(b, t, v, generator=g)  # [B, T, V] float32
ids = torch.randint(0, v, (b, t), generator=g)  # [B, T]
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
if path == "naive":
    out = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
else:
    out = token_logprobs(logits, ids)
peak = status("VmHWM") - before
torch.save(out, sys.argv[5])
print(json.dumps({"peak": peak, "logits": logits.numel() * 4}))
"""


def run(path, args, out_file):
    cmd = [sys.executable, "-c", CHILD, str(args.batch), str(args.length), str(args.vocab), path, out_file]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args()
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as d:
        naive = run("naive", args, f"{d}/naive.pt")
        ours = run("minigrpo", args, f"{d}/ours.pt")
        diff = (torch.load(f"{d}/naive.pt") - torch.load(f"{d}/ours.pt")).abs().max().item()
    gib = 2**30
    size = naive["logits"]
    print(f"logits [{args.batch}, {args.length}, {args.vocab}] float32: {size / gib:.2f} GiB")
    print(f"naive log_softmax+gather peak extra: {naive['peak'] / gib:.3f} GiB ({naive['peak'] / size:.1%} of logits)")
    print(f"minigrpo token_logprobs peak extra:  {ours['peak'] / gib:.3f} GiB ({ours['peak'] / size:.1%} of logits)")
    print(f"ratio naive / minigrpo: {naive['peak'] / max(ours['peak'], 1):.1f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
