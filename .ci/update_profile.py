"""One GRPO update timed and profiled, for .ci/gpu-check: bench_train.bench_step's step as configured (rollout, old log-probs,
update; the update's fraction of the matmul peak, 8192^3 on CUDA), its second update under torch.profiler (the top
kernels and the GPU's idle time between them). Flags are grpo.py's.  python3 .ci/update_profile.py --model ... """
import os
import sys
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402
from cli import parse_config  # noqa: E402
from config import PRESETS, GRPOConfig  # noqa: E402
from hardware import profile_summary  # noqa: E402

cfg = parse_config(GRPOConfig, PRESETS, "one GRPO update, timed and profiled", sys.argv[1:])
real, calls, profiles = bench_train.ppo_update, [], []


def ppo_update(*a, **kw):
    """The second update (the first is bench_step's warm-up) under the profiler; the timed minimum is the third's."""
    calls.append(1)
    if len(calls) != 2:
        return real(*a, **kw)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        out = real(*a, **kw)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    profiles.append(prof)
    return out


bench_train.ppo_update = ppo_update
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
r = bench_train.bench_step(asdict(cfg), {}, repeats=2)
train_s = r["old"] + r["update"]
print(f"GRPO step parts ({cfg.prompts_per_step} prompts x {cfg.group_size}, <= {cfg.max_new_tokens} tokens, {cfg.precision}): "
      f"rollout {r['rollout']:.2f} s, old log-probs {r['old']:.2f} s, update {r['update']:.2f} s; {r['tokens']} tokens")
print(f"old log-probs + update: {r['flops'] / train_s / 1e9:.1f} GFLOP/s = {r['flops'] / train_s / r['peak']:.1%} of the "
      f"measured {cfg.precision} matmul peak ({r['peak'] / 1e9:.0f} GFLOP/s, {'8192' if torch.cuda.is_available() else '2048'}^3)")
for k, v in r.items():
    if k not in ("rollout", "old", "update", "tokens", "flops", "peak"):
        print(f"{k}: {v}")  # whatever else bench_train.bench_step measures (op counts, say)
if torch.cuda.is_available():
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
print("profile of one update:")
print("\n".join(profile_summary(profiles[0])))
