"""Batched sampling with a KV cache, written by hand: the engine behind every training sample.

GRPO and BuPO (arXiv 2512.19673, Sec. 3) spend most of their time sampling groups of
responses. This file does it without `model.generate`: a left-padded prefill that
unembeds only the last position, then one token per step against a cache allocated
once, attending only over its filled part; finished sequences are dropped from the
batch (compaction) so they stop costing compute; a GRPO group's repeated prompt is
prefilled once. The decoder layers' own modules (projections, norms, rotary embedding)
and weights do the math; on CPU the linear weights are packed once per call into
oneDNN's layout, which halves the cost of the small-M products of a decode step.
Sampling follows verl/vLLM: the returned log-prob of a token is under the distribution
it was sampled from after temperature and before top-k/top-p truncation.

    python rollout.py --bench [--model M]     # ours vs HF generate, same weights and prompts
"""
import argparse
import copy
import inspect
import sys
import time
from dataclasses import dataclass, fields

import torch

from decompose import is_sandwich, load_model, softcap


@dataclass
class Rollout:
    tokens: torch.Tensor    # (B, N) sampled ids, pad_token_id after the end
    logprobs: torch.Tensor  # (B, N) log-prob of each token under the sampling distribution, 0 after the end
    lengths: torch.Tensor   # (B,) tokens generated, the EOS token included
    finished: torch.Tensor  # (B,) True where EOS was hit


def chat_prompts(tokenizer, problems):
    """Token ids of each problem's chat messages plus the assistant generation prompt (paper's format)."""
    return [tokenizer.apply_chat_template(list(p["messages"]), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in problems]


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits, top_k=0, top_p=1.0):
    """Mask to -inf all but the top_k logits, then all outside the smallest set of mass >= top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass strictly before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits, temperature, top_k, top_p, u):
    """Next tokens (B,) and their log-probs (B,) under softmax(logits / temperature).

    u: (B,) uniform draws in [0, 1), one per row, turned into tokens by the inverse CDF
    (unused when temperature is 0: greedy).
    """
    logits = logits.float()
    if temperature == 0:  # greedy; log-probs reported at temperature 1
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logp = (logits if temperature == 1 else logits / temperature).log_softmax(-1)  # (B, V)
    probs = filter_logits(logp, top_k, top_p).softmax(-1) if top_k or top_p < 1 else logp.exp()
    cdf = probs.cumsum(-1)  # (B, V)
    u = u[:, None] * cdf[:, -1:]  # (B, 1)
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)  # inverse CDF: zero-mass tokens never hit
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# ----------------------------------------------------------------------------- the forward pass

def _rope(model, x, pos):
    """cos/sin per layer type (Gemma 3 has local and global rotary bases), each (B, T, hd)."""
    rot, types = model.model.rotary_emb, getattr(model.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rot.forward).parameters:
        return {t: rot(x, pos, t) for t in set(types)}
    cs = rot(x, pos)
    return {t: cs for t in set(types or ["full_attention"])}


def pack_linears(model):
    """oneDNN-prepacked copies of every linear weight, on CPU (the layout torch.compile uses).

    A decode step's GEMMs are small-M products against big weights; with the weights
    packed once per generate call instead of at every product they run ~2x faster (lm_head
    ~3.5x) on this CPU. {} where oneDNN is unavailable: the modules are then called as is.
    """
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return {}
    return {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 64)
            for m in model.modules() if isinstance(m, torch.nn.Linear)}


def _linear(packed, mod, x):
    """mod(x) for an nn.Linear, through its packed weight when there is one."""
    w = packed.get(mod)
    if w is None:
        return mod(x)
    bias = None if mod.bias is None else mod.bias.detach()
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")  # (B*T, out)
    return y.view(*x.shape[:-1], -1)


def _mlp(packed, mlp, x):
    """The gated MLP of Llama, Qwen and Gemma, down(act(gate(x)) * up(x)), with packed weights."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp(x)  # another MLP form: the module as it is
    lin = lambda mod, v: _linear(packed, mod, v)
    return lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, x)) * lin(mlp.up_proj, x))


def _attend(layer, h, cos_sin, kv, start, key_ok, packed):
    """Self-attention of h (B, T, D) at cache slots start..start+T-1, writing its K/V into kv."""
    a = layer.self_attn
    B, T, _ = h.shape
    q = _linear(packed, a.q_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = _linear(packed, a.k_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    v = _linear(packed, a.v_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)
    if hasattr(a, "q_norm"):  # Qwen3, Gemma3
        q, k = a.q_norm(q), a.k_norm(k)
    cos, sin = cos_sin
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    K, V = kv
    K[:B, :, start:start + T] = k
    V[:B, :, start:start + T] = v
    end = start + T
    mask = None if key_ok is None else key_ok[:, None, :, :end]  # (B, 1, T, S_filled); None: every key visible
    window = getattr(a, "sliding_window", None)
    if window and end > window:  # cache slots and positions differ by a per-row constant, so the window is on slots
        q_slot = torch.arange(start, end, device=h.device)[:, None]
        in_window = torch.arange(end, device=h.device)[None, :] > q_slot - window  # (T, S_filled)
        mask = in_window[None, None] if mask is None else mask & in_window
    o = _gqa_attention(q, K[:B, :, :end], V[:B, :, :end], mask, a.scaling)  # (B, H, T, hd)
    return _linear(packed, a.o_proj, o.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


def _gqa_attention(q, K, V, mask, scale):
    """softmax(q K^T * scale + mask) V with each K/V head shared by a group of query heads.

    Written out because the fused CPU kernel copies the strided cache views; here the
    group is folded into the query length, so K and V are read in place.
    """
    B, H, T, hd = q.shape
    Hkv = K.shape[1]
    qg = q.reshape(B, Hkv, (H // Hkv) * T, hd)  # (B, Hkv, g*T, hd): heads of a group share K, V
    s = (qg @ K.transpose(-1, -2)) * scale  # (B, Hkv, g*T, S)
    s = s.view(B, Hkv, H // Hkv, T, -1)
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))  # mask: (B or 1, 1, T, S)
    p = s.float().softmax(-1).to(q.dtype).view(B, Hkv, (H // Hkv) * T, -1)
    return (p @ V).view(B, H, T, hd)


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos: (B, T, hd) -> (B, 1, T, hd)


def forward(model, ids, pos, cache, start, key_ok, packed):
    """Run the decoder on ids (B, T) at cache slots start.., return the last position's logits (B, V)."""
    x = model.model.embed_tokens(ids)  # (B, T, D), Gemma's scaling included
    rope = _rope(model, x, pos)
    types = getattr(model.config, "layer_types", None)
    for l, layer in enumerate(model.model.layers):
        cs = rope[types[l] if types else "full_attention"]
        a = _attend(layer, layer.input_layernorm(x), cs, cache[l], start, key_ok, packed)
        if is_sandwich(layer):
            x = x + layer.post_attention_layernorm(a)
            x = x + layer.post_feedforward_layernorm(_mlp(packed, layer.mlp, layer.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + _mlp(packed, layer.mlp, layer.post_attention_layernorm(x))
    return softcap(model, _linear(packed, model.lm_head, model.model.norm(x[:, -1])))  # logits only where we sample


# ----------------------------------------------------------------------------- generate

def check_args(model, prompts, max_new_tokens, temperature, top_p, top_k):
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompt {[len(p) for p in prompts].index(0)} is empty: every prompt needs at least one token")
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if n_ctx and longest + max_new_tokens > n_ctx:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {n_ctx}; shorten the prompt or lower max_new_tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if getattr(model.config, "attn_logit_softcapping", None):
        raise NotImplementedError("attention logit soft-capping (Gemma 2) is not supported by rollout.py")


def _left_pad(prompts, pad_token_id, device):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    ok = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        ok[i, P - len(p):] = True
    return ids.to(device), ok.to(device)  # (B, P) each


def prefill(model, prompts, max_new_tokens, pad_token_id, packed):
    """Run the prompts and allocate the cache; each distinct prompt runs once (a GRPO group repeats it).

    Returns the next-token logits (B, V), the cache (per layer K, V: (B, Hkv, P+N, hd)),
    key_ok (B, P+N) marking real cache slots, the next position of each row (B,), the
    padded prompt length P, and whether any prompt is padded.
    """
    dev, B = model.device, len(prompts)
    uniq = list(dict.fromkeys(map(tuple, prompts)))
    row_of = {p: i for i, p in enumerate(uniq)}
    inverse = torch.tensor([row_of[tuple(p)] for p in prompts], device=dev)  # (B,) distinct prompt of each row
    ids, ok = _left_pad(uniq, pad_token_id, dev)  # (U, P)
    U, P, S = ids.shape[0], ids.shape[1], ids.shape[1] + max_new_tokens
    pos = (ok.cumsum(-1) - 1).clamp(min=0)  # (U, P) positions counted from each row's first real token
    kv_shape = (B, model.config.num_key_value_heads, S, model.model.layers[0].self_attn.head_dim)
    cache = [(torch.empty(kv_shape, dtype=model.dtype, device=dev), torch.empty(kv_shape, dtype=model.dtype, device=dev))
             for _ in model.model.layers]
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    prefill_ok = (ok[:, None, :] & causal) | torch.eye(P, dtype=torch.bool, device=dev)  # (U, P, P); pad rows see themselves: no NaN
    logits = forward(model, ids, pos, cache, 0, prefill_ok, packed)[inverse]  # (B, V)
    if U < B:
        for K, V in cache:
            K[:, :, :P], V[:, :, :P] = K[inverse, :, :P], V[inverse, :, :P]  # (B, Hkv, P, hd) from the U prefilled rows
    key_ok = torch.ones(B, S, dtype=torch.bool, device=dev)
    key_ok[:, :P] = ok[inverse]
    return logits, cache, key_ok, pos[inverse, -1] + 1, P, not bool(ok.all())


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             eos_token_id=None, pad_token_id=0, seed=None, dtype=None, batch_index=None, batch_rows=None, max_batch=0):
    """Sample a response for each prompt (a list of token-id lists of any lengths).

    dtype: cast a copy of the weights for sampling (e.g. torch.bfloat16) while the
    caller keeps training in float32; None samples with the model as it is.
    batch_index, batch_rows: prompt i is row batch_index[i] of a batch of batch_rows
    sampled with the same seed, and gets the random draws it would get there, so a batch
    split across processes samples what one process would: at every step batch_rows
    uniforms are drawn and prompt i takes number batch_index[i].
    max_batch: sample at most this many prompts at a time (0 = all at once), which bounds
    the KV cache; by the same per-row draws the tokens do not depend on it.
    Returns a Rollout with tensors on the model's device.
    """
    check_args(model, prompts, max_new_tokens, temperature, top_p, top_k)
    index = torch.arange(len(prompts)) if batch_index is None else torch.as_tensor(batch_index)  # (B,)
    batch_rows = batch_rows or len(prompts)
    if len(index) != len(prompts) or int(index.min()) < 0 or int(index.max()) >= batch_rows or len(set(index.tolist())) < len(index):
        raise ValueError(f"batch_index must be {len(prompts)} distinct rows in 0..{batch_rows - 1} (batch_rows), one per prompt")
    if dtype is not None and dtype != model.dtype:
        model = copy.deepcopy(model).to(dtype)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    packed = pack_linears(model)  # once for every chunk
    chunk = max_batch or len(prompts)
    parts = [_decode(model, packed, prompts[c:c + chunk], index[c:c + chunk].to(model.device), batch_rows, max_new_tokens,
                     temperature, top_k, top_p, eos, pad_token_id, seed) for c in range(0, len(prompts), chunk)]
    return parts[0] if len(parts) == 1 else Rollout(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rollout)))


def _decode(model, packed, prompts, index, batch_rows, N, temperature, top_k, top_p, eos, pad_token_id, seed):
    """Prefill the prompts, then one token per step; rows[i] is the original index of active row i."""
    dev, B = model.device, len(prompts)
    eos = torch.tensor(eos, device=dev)
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    logits, cache, key_ok, next_pos, P, padded = prefill(model, prompts, N, pad_token_id, packed)
    tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, N, device=dev)
    lengths = torch.full((B,), N, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    rows, alive = torch.arange(B, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
    for t in range(N):
        u = torch.rand(batch_rows, generator=gen, device=dev)[index[rows]] if temperature else None  # (n,) these rows' draws
        tok, lp = sample(logits, temperature, top_k, top_p, u)  # (n,), (n,)
        tokens[rows[alive], t], logprobs[rows[alive], t] = tok[alive], lp[alive]
        done = alive & torch.isin(tok, eos)
        finished[rows[done]], lengths[rows[done]] = True, t + 1
        alive = alive & ~done
        n_alive = int(alive.sum())  # the one host sync per step
        if n_alive == 0 or t == N - 1:
            break
        if (len(rows) - n_alive) * 8 >= len(rows):  # compact: drop finished rows once they are 1/8 of the batch
            keep = alive.nonzero()[:, 0]
            for K, V in cache:
                K[:n_alive, :, :P + t] = K[keep, :, :P + t]  # (n_alive, Hkv, P+t, hd), in place: no reallocation
                V[:n_alive, :, :P + t] = V[keep, :, :P + t]
            rows, tok, next_pos, key_ok = rows[keep], tok[keep], next_pos[keep], key_ok[keep]
            alive = torch.ones(n_alive, dtype=torch.bool, device=dev)
        logits = forward(model, tok[:, None], next_pos[:, None], cache, P + t, key_ok[:, None, :] if padded else None, packed)
        next_pos = next_pos + 1
    return Rollout(tokens, logprobs, lengths, finished)


# ----------------------------------------------------------------------------- benchmark

def _time(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_fixed(model, batch, new_tokens):
    """Fixed-length decode (EOS ignored by both): tokens/s of HF generate and of ours."""
    torch.manual_seed(0)
    prompts = [torch.randint(100, 1000, (32,)).tolist() for _ in range(batch)]
    ids = torch.tensor(prompts, device=model.device)
    hf_kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    _, t_hf = _time(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **hf_kw))
    _, t_us = _time(lambda: generate(model, prompts, max_new_tokens=new_tokens, seed=0))
    n = batch * new_tokens
    return n / t_hf, n / t_us


def bench_grpo(model, tok, n_prompts=16, group=8, new_tokens=256):
    """The GRPO workload: math prompts x group samples, T=1, stop at EOS; count tokens up to each EOS."""
    from evaluate import load_problems  # here, not at the top: evaluate imports rollout
    problems = load_problems("math500")[:n_prompts]
    prompts = [p for p in chat_prompts(tok, problems) for _ in range(group)]
    eos = tok.eos_token_id
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts], device=model.device)
    mask = (torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long().to(model.device)
    torch.manual_seed(0)
    out, t_hf = _time(lambda: model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                             max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id))
    new = out[:, P:]
    is_eos = (new == eos)
    n_hf = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long)).sum().item()
    r, t_us = _time(lambda: generate(model, prompts, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id, seed=0))
    return n_hf / t_hf, r.lengths.sum().item() / t_us


def bench(args):
    model, tok = load_model(args.model)
    torch.set_grad_enabled(False)
    print(f"device {model.device}, dtype {model.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':<34}{'HF tok/s':>10}{'ours tok/s':>12}{'ratio':>8}")
    for batch in args.batches:
        hf, us = bench_fixed(model, batch, args.new_tokens)
        print(f"{f'fixed length, batch {batch}, {args.new_tokens} new':<34}{hf:>10.1f}{us:>12.1f}{us / hf:>7.2f}x", flush=True)
    hf, us = bench_grpo(model, tok)
    print(f"{'GRPO workload, 16x8, <=256, EOS':<34}{hf:>10.1f}{us:>12.1f}{us / hf:>7.2f}x", flush=True)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    hf, us = bench_fixed(bf, args.batches[-1], args.new_tokens)
    print(f"{f'bf16 both, batch {args.batches[-1]}':<34}{hf:>10.1f}{us:>12.1f}{us / hf:>7.2f}x", flush=True)
    print_bf16_drift(model, tok)


def print_bf16_drift(model, tok):
    """How far bf16 rollout log-probs drift from the float32 policy's on the same sampled tokens."""
    from evaluate import load_problems  # here, not at the top: evaluate imports rollout
    prompts = chat_prompts(tok, load_problems("math500")[:8])
    r = generate(model, prompts, max_new_tokens=64, seed=0, dtype=torch.bfloat16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    diffs = []
    for i, p in enumerate(prompts):
        resp = r.tokens[i, :r.lengths[i]]
        ids = torch.tensor(p + resp.tolist())[None]
        lp = model(ids).logits[0, len(p) - 1:-1].float().log_softmax(-1).gather(-1, resp[:, None])[:, 0]
        diffs.append((lp - r.logprobs[i, :r.lengths[i]]).abs())
    d = torch.cat(diffs)
    print(f"bf16 rollout log-probs vs float32 policy on {len(d)} tokens: mean |diff| {d.mean():.4f}, max {d.max():.4f}")


def main():
    p = argparse.ArgumentParser(description="Batched KV-cache sampling; --bench compares with HF generate.")
    p.add_argument("--bench", action="store_true", help="run the benchmark against HF generate")
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes of the fixed-length case")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens in the fixed-length case")
    p.add_argument("--prompt", default="What is 12 + 7?", help="without --bench: a user turn to answer")
    args = p.parse_args()
    if args.bench:
        return bench(args)
    model, tok = load_model(args.model)
    prompts = chat_prompts(tok, [{"messages": [{"role": "user", "content": args.prompt}]}])
    r = generate(model, prompts, max_new_tokens=128, temperature=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    print(tok.decode(r.tokens[0, :r.lengths[0]], skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
