"""The decode loop behind rollout.generate: one static step per token, continuous batching, buffers kept across calls.

A `Decoder` holds everything a decode step reads and writes, at fixed shapes and
addresses: the KV cache of B rows x S slots per layer, each row's last token, position,
step index and uniform draws, and its sampled tokens and log-probs. Nothing a step reads
is a Python number that changes between calls (the call's prompt length and token budget
are tensors), so with static shapes (CUDA) a Decoder is kept across calls and its CUDA
graphs, one per (bucket, span), are captured once and replayed by every later GRPO step
(graphs.py: the capture, the opt-in torch.compile of the forward, and the fallbacks). A
call that needs more rows or slots than the kept Decoder has builds a larger one. An
evaluation keeps its Decoders apart (kept_apart) and drops them at its end: the training
rollout's, and their graphs, live on from step to step.

Continuous batching: at the host's checks, rows that ended hand their outputs over
(_harvest), the live rows move to the front (_compact) and waiting prompts are prefilled
into the freed rows (_admit); every row draws its own prompt's uniforms, so a prompt's
tokens do not depend on the batch it runs in.
"""
import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvcache import cast_copy, forward, prefill
from graphs import Steps
from sampling import sample

SPAN = 128  # static shapes attend the cache in spans of this many slots: one CUDA graph per (bucket, span)
KEEP = 2  # Decoders (and sampling copies) kept across calls, the most recent first (evaluations keep theirs apart)


@dataclass
class State:
    """Row r decodes prompt rows[r] (the call's prompt count: none) at its own token index t[r]. Rows [:b] run
    (b: the bucket); a row that is not live samples too, but writes nothing it keeps."""
    rows: torch.Tensor      # (B,) the prompt of each row
    tok: torch.Tensor       # (B,) the last sampled token
    pos: torch.Tensor       # (B,) its position
    alive: torch.Tensor     # (B,) still generating
    key_ok: torch.Tensor    # (B, S) cache slots that hold real tokens (False: padding before the prompt)
    t: torch.Tensor         # (B,) the index of the token each row samples next
    u: torch.Tensor         # (B, n) the uniform draw of each step of the row's prompt
    tokens: torch.Tensor    # (B, n) the row's sampled tokens
    logprobs: torch.Tensor  # (B, n)
    lengths: torch.Tensor   # (B,)
    finished: torch.Tensor  # (B,)
    P: torch.Tensor         # () the call's longest prompt: every prompt ends at slot P - 1
    N: torch.Tensor         # () the call's max_new_tokens


def _record(s, rows, logits, opts):
    """Sample token t of the rows `rows` (a slice) from their logits (rows, V); live rows record it and advance."""
    alive, t, r = s.alive[rows], s.t[rows], opts["index"][rows]
    tok, lp = sample(logits, opts["temperature"], opts["top_k"], opts["top_p"], s.u[r, t])
    s.tokens.index_put_((r, t), torch.where(alive, tok, s.tokens[r, t]))
    s.logprobs.index_put_((r, t), torch.where(alive, lp, s.logprobs[r, t]))
    done = alive & (tok[:, None] == opts["eos"]).any(-1)  # not torch.isin: past ~10-23 ids it sorts and syncs the host
    s.lengths[rows] = torch.where(done, t + 1, s.lengths[rows])
    s.finished[rows] |= done
    s.alive[rows] = alive & ~done & (t + 1 < s.N)
    s.tok[rows] = tok
    s.t[rows] = t + s.alive[rows]  # a row that stops keeps its last index


def _step(fwd, model, packed, cache, s, b, span, opts):
    """The decode step of rows [:b]: run each row's last token (cache slot P+t-1) through fwd (kvcache.forward,
    compiled or not), sample its token t (never compiled: sampling.py's scan over the vocabulary stays eager)."""
    slot = s.t[:b] + (s.P - 1)  # (b,)
    mask = None
    # padding, rows at different steps, or slots beyond the filled ones (static shapes attend a fixed span)
    if opts["masked"]:
        mask = (s.key_ok[:b, :span]
                & (torch.arange(span, device=slot.device) <= slot[:, None]))[:, None, None]  # (b, 1, 1, span)
    logits = fwd(model, s.tok[:b, None], s.pos[:b, None], cache, slot[:, None], span, mask, packed, opts["sdpa"])
    _record(s, slice(0, b), logits, opts)
    s.pos[:b] += 1


class Decoder:
    """The fixed buffers of up to B rows, S cache slots and n new tokens for one model and sampling setting, and
    the step that runs on them (graphs.Steps: compiled or not, graphed or not)."""

    def __init__(self, model, B, S, n, opts, static, graphs, compile):
        dev, a, long = model.device, model.model.layers[0].self_attn, dict(dtype=torch.long, device=model.device)
        self.model, self.B, self.S, self.n, self.static, self.weights = model, B, S, n, static, _addresses(model)
        shape = (B, model.config.num_key_value_heads, S, a.head_dim)
        # zeros: a masked slot weighs 0, and 0 * NaN of uninitialized memory is NaN
        self.cache = [tuple(torch.zeros(shape, dtype=model.dtype, device=dev) for _ in "KV")
                      for _ in model.model.layers]
        self.s = State(rows=torch.zeros(B, **long), tok=torch.zeros(B, **long), pos=torch.zeros(B, **long),
                       alive=torch.zeros(B, dtype=torch.bool, device=dev),
                       key_ok=torch.ones(B, S, dtype=torch.bool, device=dev),
                       t=torch.zeros(B, **long), u=torch.zeros(B, n, device=dev), tokens=torch.zeros(B, n, **long),
                       logprobs=torch.zeros(B, n, device=dev), lengths=torch.zeros(B, **long),
                       finished=torch.zeros(B, dtype=torch.bool, device=dev), P=torch.zeros((), **long),
                       N=torch.zeros((), **long))
        self.opts = {**opts, "index": torch.arange(B, device=dev), "masked": static}
        self.steps = Steps(self.s, forward, graphs, compile)


def _addresses(model):
    return tuple(x.data_ptr() for x in (*model.parameters(), *model.buffers()))


_DECODERS, _COPIES = OrderedDict(), OrderedDict()


def _kept(store, key, value):
    store[key] = value
    store.move_to_end(key)
    while len(store) > KEEP:
        store.popitem(last=False)
    return value


def decoder(model, B, S, n, opts, static, graphs, compile):
    """A Decoder for B rows of S slots and n new tokens: with static shapes the kept one of this model and setting
    when it is large enough, else a new one (kept in its place, at least as large); without, a new one per call."""
    if not static:
        return Decoder(model, B, S, n, opts, static, graphs, compile)
    key = (id(model), opts["temperature"], opts["top_k"], opts["top_p"], tuple(opts["eos"].tolist()), opts["sdpa"],
           graphs, compile)
    d = _DECODERS.pop(key, None)
    # the same model with its weights where they were (FSDP's gathered weights, say, may move: a graph would read
    # the old place)
    same = d is not None and d.model is model and d.weights == _addresses(model)
    if not (same and d.B >= B and d.S >= S and d.n >= n):
        if same:
            B, S, n = max(B, d.B), max(S, d.S), max(n, d.n)
        d = None  # the old one's memory goes before the new one's comes
        d = Decoder(model, B, -(-S // SPAN) * SPAN, n, opts, static, graphs, compile)
    return _kept(_DECODERS, key, d)


def sampling_copy(model, dtype):
    """A copy of model in dtype (cast_copy) that is kept across calls and refreshed in place from the model's
    current weights: its addresses stay, so CUDA graphs captured on it stay valid while training moves the weights."""
    key = (id(model), dtype)
    ref, copy = _COPIES.get(key, (None, None))
    if ref is None or ref() is not model:
        return _kept(_COPIES, key, (weakref.ref(model), cast_copy(model, dtype)))[1]
    with torch.no_grad():
        for dst, src in zip((*copy.parameters(), *copy.buffers()), (*model.parameters(), *model.buffers())):
            dst.copy_(src)  # in dst's dtype: inv_freq stays float32 in the copy
    _COPIES.move_to_end(key)
    return copy


@contextlib.contextmanager
def kept_apart():
    """A block that owns its Decoders: those it builds are kept for its calls (an evaluation's windows) and dropped at
    its end, memory for training; those kept before (the training rollout's, with their CUDA graphs) are neither used
    nor dropped. Sampling copies stay shared: refreshed in place from the model, they hold what a new copy would."""
    global _DECODERS
    outer, _DECODERS = _DECODERS, OrderedDict()
    try:
        yield
    finally:
        _DECODERS = outer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def release():
    """Drop every kept Decoder and sampling copy (their KV caches, graphs and weights): memory for other work."""
    _DECODERS.clear()
    _COPIES.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the loop

def _bucket(n, B, static):
    """Rows to run for n live ones: n itself, or with static shapes the next power of two (at most B)."""
    return n if not static else min(B, 1 << (n - 1).bit_length())


def _span(filled, S, static):
    """Cache slots to attend: the filled ones, or with static shapes the next multiple of SPAN (at most S): a power
    of two would read up to twice the filled cache."""
    return filled if not static else min(S, -(-filled // SPAN) * SPAN)


def _harvest(s, out, none):
    """Copy the outputs of the rows that ended to out (tokens, logprobs, lengths, finished by prompt); their rows
    are free from then on (rows = none). Returns how many ended."""
    ended = ((s.rows != none) & ~s.alive).nonzero()[:, 0]
    p, n = s.rows[ended], out[0].shape[1]
    for o, x in zip(out, (s.tokens[:, :n], s.logprobs[:, :n], s.lengths, s.finished)):
        o[p] = x[ended]
    s.rows[ended] = none
    return len(ended)


def _compact(s, cache, b, filled):
    """Move the live rows of [:b] to the front (cache included); returns how many there are."""
    keep = s.alive[:b].nonzero()[:, 0]  # (n,)
    for K, V in cache:
        K[:len(keep), :, :filled], V[:len(keep), :, :filled] = K[keep, :, :filled], V[keep, :, :filled]
    for x in (s.rows, s.tok, s.pos, s.alive, s.key_ok, s.t, s.u, s.tokens, s.logprobs, s.lengths, s.finished):
        x[:len(keep)] = x[keep]
    return len(keep)


def _admit(d, rows, first, prompts, u, pad):
    """Prefill prompts first, first+1, ... into the free rows `rows` (a slice), each ending at slot P-1, and sample
    their token 0 with their uniforms u (len(prompts), n). Returns whether any of their slots is padding."""
    s, P = d.s, int(d.s.P)
    logits, next_pos, padded = prefill(d.model, prompts, [(K[rows], V[rows]) for K, V in d.cache], s.key_ok[rows], P,
                                       pad, d.packed, d.opts["sdpa"])
    s.rows[rows] = torch.arange(first, first + len(prompts), device=s.rows.device)
    s.pos[rows], s.alive[rows], s.t[rows] = next_pos, True, 0
    s.u[rows, :u.shape[1]], s.tokens[rows], s.logprobs[rows], s.lengths[rows], s.finished[rows] = (
        u, pad, 0.0, s.N, False)
    _record(s, rows, logits, d.opts)
    return padded


def decode(d, prompts, u, pad, sync_every, max_rows, on_done):
    """Sample every prompt on Decoder d, up to max_rows (0: all) at a time; u (n, len(prompts)): each step's uniform
    draw of each prompt. Returns (tokens, logprobs, lengths, finished) by prompt; on_done(m) hears of the m prompts
    that ended each time the host moves them out (a progress bar's steps).

    One static step per token; the host reads the device every sync_every steps (static shapes, else every
    step), to stop, to move finished rows out (once the bucket can shrink, or 1/8 of the rows ended) and to
    admit waiting prompts into freed rows (>= B/8 at a time, or all that are left)."""
    s, (N, n_prompts), dev = d.s, u.shape, d.model.device
    B, P = min(max_rows or n_prompts, n_prompts), max(map(len, prompts))
    out = (torch.full((n_prompts, N), pad, dtype=torch.long, device=dev), torch.zeros(n_prompts, N, device=dev),
           torch.full((n_prompts,), N, dtype=torch.long, device=dev),
           torch.zeros(n_prompts, dtype=torch.bool, device=dev))
    s.rows.fill_(n_prompts)
    s.alive.fill_(False)
    s.P.fill_(P)
    s.N.fill_(N)
    u = u.T.contiguous()  # (n_prompts, N)
    b = waiting = step = 0
    every = sync_every if d.static else 1
    while True:
        if step % every == 0:  # the host's only reads of the device
            n, t_all, t_live = (torch.stack([s.alive[:b].sum(), s.t[:b].max(), (s.t[:b] * s.alive[:b]).max()]).tolist()
                                if b else (0,) * 3)
            t_max = t_all  # the furthest row of [:b]: rows that ended run too, until a compaction drops them
            admit = min(B - n, n_prompts - waiting)
            refill = admit > 0 and (admit == n_prompts - waiting or admit * 8 >= B)
            moved = n < b and (refill or (_bucket(n, B, d.static) < b if d.static else (b - n) * 8 >= b))
            if moved:
                on_done(_harvest(s, out, n_prompts))
                _compact(s, d.cache, b, P + t_all)
                t_max = t_live  # only the live rows stay, at [:n]; the bucket's other rows restart at t = 0
            if refill:  # rows at different steps from now on, unless none is live
                d.opts["masked"] |= _admit(d, slice(n, n + admit), waiting, prompts[waiting:waiting + admit],
                                           u[waiting:waiting + admit], pad) or n > 0
                waiting, n, t_max = waiting + admit, n + admit, max(t_max, 1)
            if n == 0:
                break
            if moved or refill:  # the live rows are [:n] now; the bucket's other rows pad it
                b = _bucket(n, B, d.static)
                s.rows[n:b], s.alive[n:b], s.key_ok[n:b], s.t[n:b] = n_prompts, False, True, 0
        span = _span(P + t_max, d.S, d.static)
        d.steps.run((b, span, d.opts["masked"]), lambda fwd: _step(fwd, d.model, d.packed, d.cache, s, b, span, d.opts))
        step, t_max = step + 1, t_max + 1
    on_done(_harvest(s, out, n_prompts))
    return out
