"""What the machine can do, measured: a timer that waits for the device, memory bandwidth, matmul peak, a profile.

Every benchmark here (bench.py: rollout, grpo, bupo) reports its speed beside
the hardware's limit measured in the same run, and every timed part of a training step
uses `clock`: a CUDA timer that does not synchronize times the kernel launches only.
"""
import time

import torch

CARD_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, the makers' figures


def clock(device):
    """time.perf_counter() after the device's queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device):
    """(fn(), seconds it took on device)."""
    t = clock(device)
    out = fn()
    return out, clock(device) - t


def bandwidth(device, given_gbs=0.0):
    """(bytes/s, source): given_gbs, else the card's figure by name, else a 256 MB copy measured now (read + write)."""
    if given_gbs:
        return given_gbs * 1e9, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in CARD_BANDWIDTH.items():
            if key in name:
                return bw, f"{name}, maker's figure"
    x, y = (torch.empty(1 << 28, dtype=torch.uint8, device=device) for _ in range(2))
    best = min(timed(lambda: y.copy_(x), device)[1] for _ in range(5))
    return 2 * x.numel() / best, "measured copy"


def matmul_peak(dtype, device="cpu", n=0):
    """FLOP/s of a plain n x n x n matmul in dtype on device, best of 5 after a warm-up, measured now: the machine's
    practical peak (n: 8192 on CUDA, enough to fill a H100/H200; 2048 on CPU)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = [timed(lambda: a @ b, device)[1] for _ in range(6)]
    return 2 * n ** 3 / min(times[1:])


def profile_summary(prof, top=8):
    """Lines summing up a torch.profiler run: the `top` CUDA kernels (CPU ops without CUDA) by their own time, and on
    CUDA how long the GPU sat idle between kernels (the CPU issuing them: launch overhead, host syncs)."""
    cuda = any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernel = (lambda e: getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) if cuda else (lambda e: True)
    # not the CPU ops launching them too
    rows = sorted((e for e in prof.key_averages() if getattr(e, key) > 0 and kernel(e)),
                  key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in rows)
    lines = [f"{'calls':>7} {'ms':>9} {'share':>6}  top {'kernels' if cuda else 'ops (CPU)'} by own time"]
    lines += [f"{e.count:>7} {getattr(e, key) / 1e3:>9.2f} {getattr(e, key) / total:>6.1%}  {e.key[:90]}"
              for e in rows[:top]]
    if cuda:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
        busy, wall = busy_time(spans)
        lines.append(f"{len(spans)} kernels over {wall / 1e3:.1f} ms: GPU busy {busy / 1e3:.1f} ms "
                     f"({busy / wall:.0%}), idle between kernels {(wall - busy) / 1e3:.1f} ms")
    return lines


def busy_time(spans):
    """(time covered by the union of the (start, end) intervals, time from the first start to the last end)."""
    spans = sorted(spans)
    busy, end = 0.0, spans[0][0]
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy, end - spans[0][0]
