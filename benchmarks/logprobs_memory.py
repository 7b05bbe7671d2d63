"""Peak memory of minigrpo's log-probability paths vs the naive ones, at Qwen2.5's vocabulary.

    .venv/bin/python benchmarks/logprobs_memory.py [--batch 8 --length 512 --vocab 151936 --hidden 896]

Two comparisons:
1. from logits [B, T, V] (no grad): `token_logprobs` vs log_softmax + gather;
2. from last hidden states [B*T, H] through the LM head, forward AND backward (the training
   case): `scoring.head_logprobs` (chunked, recomputed in backward) vs head -> [B, T, V] logits
   -> log_softmax -> gather -> backward. H = 896 is Qwen2.5-0.5B's hidden size.

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

b, t, v, h_dim, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, v, (b, t), generator=g)  # [B, T]
if path in ("naive", "minigrpo"):
    logits = torch.randn(b, t, v, generator=g)  # [B, T, V] float32
else:
    from minigrpo.scoring import head_logprobs
    head = torch.nn.Linear(h_dim, v, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)
    h = torch.randn(b * t, h_dim, generator=g).requires_grad_(True)  # [B*T, H]
    head.weight.grad = torch.zeros_like(head.weight)  # both paths write this; allocate it up front
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
if path == "naive":
    out = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
elif path == "minigrpo":
    out = token_logprobs(logits, ids)
elif path == "hidden_naive":
    out = torch.log_softmax(head(h).view(b, t, v), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    out.sum().backward()
else:
    out = head_logprobs(head, h, ids.view(-1)).view(b, t)  # [B, T]
    out.sum().backward()
peak = status("VmHWM") - before
torch.save(out.detach(), sys.argv[6])
print(json.dumps({"peak": peak, "logits": b * t * v * 4}))
"""


def run(path, args, out_file):
    cmd = [sys.executable, "-c", CHILD, str(args.batch), str(args.length), str(args.vocab), str(args.hidden), path, out_file]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    args = p.parse_args()
    import tempfile

    import torch

    gib = 2**30
    print(f"logits [{args.batch}, {args.length}, {args.vocab}] float32: {args.batch * args.length * args.vocab * 4 / gib:.2f} GiB")
    for title, naive_path, ours_path in (
        ("1. from logits, no grad", "naive", "minigrpo"),
        (f"2. from hidden states [B*T, {args.hidden}] through the LM head, forward + backward", "hidden_naive", "hidden"),
    ):
        with tempfile.TemporaryDirectory() as d:
            naive = run(naive_path, args, f"{d}/naive.pt")
            ours = run(ours_path, args, f"{d}/ours.pt")
            diff = (torch.load(f"{d}/naive.pt") - torch.load(f"{d}/ours.pt")).abs().max().item()
        size = naive["logits"]
        print(title)
        print(f"   naive peak extra:    {naive['peak'] / gib:6.3f} GiB ({naive['peak'] / size:6.1%} of the logits' size)")
        print(f"   minigrpo peak extra: {ours['peak'] / gib:6.3f} GiB ({ours['peak'] / size:6.1%} of the logits' size)")
        print(f"   ratio naive / minigrpo: {naive['peak'] / max(ours['peak'], 1):.1f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
