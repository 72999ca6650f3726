"""What the machine can do, measured: a timer that waits for the device, memory bandwidth, matmul peak.

Every benchmark here (rollout.py, grpo.py and bupo.py's --bench) reports its speed beside
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


def matmul_peak(dtype, device="cpu", n=2048):
    """FLOP/s of a plain n x n x n matmul in dtype on device, best of 5 after a warm-up, measured now: the machine's
    practical peak."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = [timed(lambda: a @ b, device)[1] for _ in range(6)]
    return 2 * n ** 3 / min(times[1:])
