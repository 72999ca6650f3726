"""The decode step's fast paths, each checked and each with a way back: CUDA graphs, torch.compile, eager.

decode.py runs one step function per (batch bucket, cache span). On CUDA with static
shapes it is captured as a CUDA graph on its first use and replayed after, as nano-vllm
captures its model forward per batch size: the step reads and writes only fixed buffers
(decode.State, the KV cache), so a replay needs no input copied in. torch.compile is
opt-in (rollout.generate(compile=True), `--compile` on the CLIs that sample) and compiles
the decoder forward alone: the sampling after it (sampling.py's cumsum over the whole
vocabulary) stays eager, the split scan that inductor got wrong (pytorch/pytorch#180221)
never compiled.

Each fast path can fail on a machine nobody tested: compile or its warm-up (an inductor
bug), the capture (a kernel that syncs the host), or the graph itself (a replay that does
not do what the eager step did). Any such failure falls back, once per process and with
one line on stderr naming the reason, to the next path: graphs with compile, graphs,
eager. The first replay of every graph is checked against the warm-up run of the same
step from the same state; a replay that differs falls back too.
"""
import sys
from dataclasses import fields

import torch

from hardware import clock

# torch.compile's settings for the forward: one compile serves every bucket and span
COMPILE = dict(dynamic=True, fullgraph=True)
# the most compiles of the forward a GRPO run makes (tests/test_fastpaths.py), below dynamo's recompile_limit (8)
RECOMPILES = 6
# pytorch/pytorch#180221 (split-scan codegen crash) fixed by PR #180369, merged 2026-04-17, after 2.11
COMPILE_FIXED_IN = (2, 12)
FELL_BACK = {}  # "compile" / "graphs" -> the reason this process stopped using it


def torch_version():
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def fall_back(path, reason):
    """Stop using `path` ("compile" or "graphs") in this process; the first time, one line on stderr says why."""
    if path not in FELL_BACK:
        FELL_BACK[path] = reason
        what = "torch.compile" if path == "compile" else "CUDA graphs"
        print(f"warning: rollout: {what} off for this process ({reason}); the decode step runs without {what}",
              file=sys.stderr, flush=True)


def why(e):
    """An exception as one short line: its type and first line, and those of its root cause (a backend's error
    that dynamo wraps, say)."""
    line = lambda x: f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0][:120]}"
    root = e
    while getattr(root, "inner_exception", None) or root.__cause__:
        root = getattr(root, "inner_exception", None) or root.__cause__
    return line(e) if root is e else f"{line(e)} <- {line(root)}"


def compile_allowed(device):
    """Whether torch.compile may run on device in this process (else it has fallen back, the reason said once)."""
    if device.type == "cuda" and torch_version() < COMPILE_FIXED_IN:
        fall_back("compile", f"torch {torch.__version__} has pytorch/pytorch#180221; needs torch >= "
                             f"{'.'.join(map(str, COMPILE_FIXED_IN))}")
    return "compile" not in FELL_BACK


def compiled(fn):
    return torch.compile(fn, **COMPILE)


def capture(fn, pool):
    """A CUDA graph of fn (its kernels recorded, not run), drawing its memory from `pool` (None: a new pool)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g


def snapshot(state):
    return {f.name: getattr(state, f.name).clone() for f in fields(state)}


def restore(state, saved):
    for name, v in saved.items():
        getattr(state, name).copy_(v)


def differs(state, want):
    """Why state differs from the snapshot `want` (None if it does not): integer fields exactly, floats within
    1e-3 (the same kernels on the same inputs give the same bits; a broken graph gives other values)."""
    for name, w in want.items():
        x = getattr(state, name)
        same = torch.equal(x, w) if not w.is_floating_point() else torch.allclose(x, w, rtol=1e-3, atol=1e-3)
        if not same:
            return f"the first replay's {name} differs from its warm-up's"
    return None


class Steps:
    """Runs the step of each key (bucket, span, ...): its CUDA graph where one was captured, else the step with
    the forward it was given (compiled or eager). The first run of a key is a warm-up (lazy library init, the
    compile), then the capture and a checked first replay; any failure falls back (fall_back).
    setup_s: seconds of the warm-ups, compiles and captures so far, apart from the steps proper."""

    def __init__(self, state, forward, graphs, compile):
        self.state, self.eager, self.graphs, self.pool, self.seen, self.setup_s = state, forward, {}, None, set(), 0.0
        self.graphed, self.compiled = graphs, compile and compile_allowed(state.t.device)
        self.forward = compiled(forward) if self.compiled else forward

    @property
    def mode(self):
        return ("graphs+compile" if self.graphed and self.compiled else "graphs" if self.graphed
                else "compile" if self.compiled else "eager")

    def run(self, key, step):
        """step(forward): the step of `key` (run with the forward given), on the fixed buffers."""
        if key in self.graphs:
            return self.graphs[key].replay()
        if key in self.seen or not (self.graphed or self.compiled):
            return self._step(step)
        t0 = clock(self.state.t.device)
        self._first(key, step)
        self.seen.add(key)
        self.setup_s += clock(self.state.t.device) - t0

    def _step(self, step):
        """step(forward) without a graph; a compiled forward that fails (a recompile past dynamo's limit, say: it fails
        before it runs) falls back to the eager one."""
        if not self.compiled:
            return step(self.forward)
        try:
            return step(self.forward)
        except Exception as e:
            fall_back("compile", why(e))
            self.compiled, self.forward = False, self.eager
            return step(self.forward)

    def _first(self, key, step):
        """The first run of key: the warm-up, the compile where compiled, and the capture where graphed."""
        saved = snapshot(self.state) if self.graphed or self.compiled else None
        if self.compiled and "compile" not in FELL_BACK:
            try:
                self._warm(lambda: step(self.forward))
            except Exception as e:  # an inductor or dynamo failure, at compile or at the first call
                fall_back("compile", why(e))
                restore(self.state, saved)
        if self.compiled and "compile" in FELL_BACK:
            self.compiled, self.forward = False, self.eager
            self._warm(lambda: step(self.forward))
        elif not self.compiled:
            self._warm(lambda: step(self.forward))
        if not self.graphed or "graphs" in FELL_BACK:
            self.graphed = False
            return  # the warm-up was the step itself
        warm = snapshot(self.state)
        restore(self.state, saved)
        try:
            g = capture(lambda: step(self.forward), self.pool)
            g.replay()
            bad = differs(self.state, warm)
            if bad:
                raise RuntimeError(bad)
        except Exception as e:  # a capture that fails, or a replay that does not do what the step did
            fall_back("graphs", why(e))
            self.graphed, self.graphs = False, {}
            restore(self.state, saved)  # and run the step again eagerly: a bad replay may have written wrong K/V
            self._warm(lambda: step(self.forward))
            return
        self.pool = self.pool or g.pool()  # the graphs share one memory pool: they never run at once
        self.graphs[key] = g

    def _warm(self, fn):
        """fn() on a side stream on CUDA (what a capture needs first), else as it is."""
        if not self.state.t.is_cuda:
            return fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                fn()
        finally:  # a warm-up that raises still leaves its queued kernels ordered before what follows
            torch.cuda.current_stream().wait_stream(side)
