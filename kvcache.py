"""The decoder's forward pass against a KV cache, from the Hugging Face model's own modules: rollout.py's engine.

No modeling code is copied: each decoder layer's projections, norms, rotary embedding and
MLP are called as they are; this file only routes them through a cache that rollout.py
allocates once per call, so that a decode step has fixed shapes (CUDA graphs) and reads
the cache in place. On CPU every linear weight is packed once into oneDNN's layout.
Supports the architectures of models.SUPPORTED: pre-norm Llama/Qwen2/Qwen3 blocks and
Gemma 3's sandwich blocks with sliding-window layers.
"""
import copy
import inspect

import torch
import torch.nn.functional as F

from decompose import is_sandwich, softcap

def cast_copy(model, dtype):
    """A copy of the model in dtype whose rotary frequencies stay float32, as in a model built in that dtype:
    inv_freq rounded to bf16 would give each frequency its own slightly wrong base, an error that grows with
    position."""
    out = copy.deepcopy(model).to(dtype)
    for mod, src in zip(out.modules(), model.modules()):
        for name in [n for n in mod._buffers if "inv_freq" in n]:
            mod._buffers[name] = src._buffers[name].detach().float().clone()
    return out


def pack_linears(model):
    """oneDNN-prepacked copies of every linear weight, on CPU (the layout torch.compile uses), for one generate call.

    A decode step's GEMMs are small-M products against big weights; with the weights
    packed once per call instead of at every product they run ~2x faster (the lm_head
    ~3.5x) on this CPU. Not cached across calls: an optimizer may change the weights in
    place without bumping their version counter (fused AdamW does), and a stale packed
    weight would sample from an old policy. {} off CPU or where oneDNN is unavailable:
    the modules are then called as they are.
    """
    if (model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()):
        return {}
    return {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 64) for m in model.modules()
            if isinstance(m, torch.nn.Linear)}


def _linear(packed, mod, x):
    """mod(x) for an nn.Linear, through its packed weight when there is one."""
    w = packed.get(mod)
    if w is None:
        return mod(x)
    bias = None if mod.bias is None else mod.bias.detach()
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")  # (B*T, out)
    return y.reshape(*x.shape[:-1], -1)


def _mlp(packed, mlp, x):
    """The gated MLP of Llama, Qwen and Gemma, down(act(gate(x)) * up(x)), with packed weights."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp(x)  # another MLP form: the module as it is
    lin = lambda mod, v: _linear(packed, mod, v)
    return lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, x)) * lin(mlp.up_proj, x))


def _rope(model, x, pos):
    """cos/sin per layer type (Gemma 3 has local and global rotary bases), each (B, T, hd)."""
    rot, types = model.model.rotary_emb, getattr(model.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rot.forward).parameters:
        return {t: rot(x, pos, t) for t in set(types)}
    cs = rot(x, pos)
    return {t: cs for t in set(types or ["full_attention"])}


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos: (B, T, hd) -> (B, 1, T, hd)


def _fold(q, mask, kv_heads):
    """Grouped-query attention as plain multi-head attention: the g query heads that share a K/V head folded into
    the query length, q (B, H, T, hd) -> (B, Hkv, g*T, hd), the mask (b, 1, T, S) repeated to (b, 1, g*T, S)."""
    B, H, T, hd = q.shape
    g = H // kv_heads
    if mask is not None and T > 1:
        mask = mask[:, :, None].expand(mask.shape[0], 1, g, T, mask.shape[-1]).reshape(mask.shape[0], 1, g * T, -1)
    return q.reshape(B, kv_heads, g * T, hd), mask


def _attention(q, K, V, mask, scale, sdpa):
    """softmax(q K^T * scale, where mask) V, each K/V head shared by a group of query heads (q: (B, H, T, hd)).

    The groups are folded into the query length (_fold), so K and V are read in place as they are. sdpa
    (the default on CUDA): one fused call, which on these plain multi-head inputs keeps to its fused kernels,
    where enable_gqa with a mask falls back to the math kernel (K/V repeated to every head, in float32). Else
    written out (the default on CPU, where the fused kernel copies the strided cache views). The output's
    layout is the kernel's choice (flash and memory-efficient return (B, Hkv, g*T, hd) laid out as
    (B, g*T, Hkv, hd); cuDNN, math and CPU contiguous): it is reshaped, which copies where it must, never viewed.
    """
    B, H, T, hd = q.shape
    qf, mf = _fold(q, mask, K.shape[1])  # (B, Hkv, g*T, hd), (b, 1, g*T, S)
    if sdpa:
        o = F.scaled_dot_product_attention(qf, K, V, attn_mask=mf, scale=scale)  # (B, Hkv, g*T, hd), any strides
    else:
        s = (qf @ K.transpose(-1, -2)) * scale  # (B, Hkv, g*T, S)
        if mf is not None:
            s = s.masked_fill(~mf, float("-inf"))
        o = s.float().softmax(-1).to(q.dtype) @ V  # (B, Hkv, g*T, hd)
    return o.reshape(B, H, T, hd)  # head h = kv * g + j: the fold undone


def _window_mask(mask, slots, span, window):
    """mask (b, 1, T, span) or None, and with a sliding window its slots: cache slots and positions differ by a
    per-row constant, so the window is taken on slots."""
    if not window:
        return mask
    in_window = (torch.arange(span, device=slots.device) > slots[..., None] - window).view(-1, 1, slots.shape[-1], span)
    return in_window if mask is None else mask & in_window


def _attend(layer, h, cos_sin, K, V, slots, mask, packed, sdpa):
    """Self-attention of h (B, T, D) whose keys and values go to cache slots `slots` of K, V (B, Hkv, span, hd):
    (T,), the same for every row, or (B, 1), a slot per row; mask (b, 1, T, span) or None, its window included."""
    a = layer.self_attn
    B, T, _ = h.shape
    q = _linear(packed, a.q_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = _linear(packed, a.k_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    v = _linear(packed, a.v_proj, h).view(B, T, -1, a.head_dim).transpose(1, 2)
    if hasattr(a, "q_norm"):  # Qwen3, Gemma3
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = _apply_rope(q, *cos_sin), _apply_rope(k, *cos_sin)
    if slots.dim() == 1:  # the same slots for every row
        K.index_copy_(2, slots, k)
        V.index_copy_(2, slots, v)
    else:  # (B, 1): a slot per row (rows at different steps), T = 1; an index_put: scatter_ along dim 2 with an
        # expanded index ran ~50x slower on CPU (1.1 ms a call at B = 256), 10 s of a 5-minute experiment
        rows = torch.arange(B, device=slots.device)
        K[rows, :, slots[:, 0]] = k[:, :, 0]  # (B, Hkv, hd) into row b's slot
        V[rows, :, slots[:, 0]] = v[:, :, 0]
    o = _attention(q, K, V, mask, a.scaling, sdpa)  # (B, H, T, hd)
    return _linear(packed, a.o_proj, o.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


def forward(model, ids, pos, cache, slots, span, mask, packed, sdpa):
    """Decoder on ids (B, T) at positions pos (B, T), written to cache slots `slots` ((T,) or (B, 1)), attending the
    first `span` slots where mask (B, 1, T, span) is True (None: all), through SDPA or written out (sdpa); returns
    the last position's logits (B, V)."""
    B = ids.shape[0]
    x = model.model.embed_tokens(ids)  # (B, T, D), Gemma's scaling included
    rope = _rope(model, x, pos)
    types = getattr(model.config, "layer_types", None)
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]
    masks = {w: _window_mask(mask, slots, span, w) for w in set(windows)}  # built once per call, not per layer
    for l, layer in enumerate(model.model.layers):
        K, V = (c[:B, :, :span] for c in cache[l])  # views: the call's one cache, read in place
        a = _attend(layer, layer.input_layernorm(x), rope[types[l] if types else "full_attention"], K, V, slots,
                    masks[windows[l]], packed, sdpa)
        if is_sandwich(layer):
            x = x + layer.post_attention_layernorm(a)
            x = x + layer.post_feedforward_layernorm(_mlp(packed, layer.mlp, layer.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + _mlp(packed, layer.mlp, layer.post_attention_layernorm(x))
    return softcap(model, _linear(packed, model.lm_head, model.model.norm(x[:, -1])))  # logits only where we sample



def common_prefix(prompts):
    """Length of the prefix that all prompts share (a system prompt, say), leaving each at least its last token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


def prefill(model, prompts, cache, key_ok, end, pad_token_id, packed, sdpa):
    """Run each distinct prompt once, its keys and values written to its rows of `cache` (per layer K, V views
    (B, Hkv, S, hd)) so that every prompt ends at slot end - 1.

    The prefix all distinct prompts share (a chat template's system prompt) runs once too,
    at slots 0..C-1 of the part written; the rest of each prompt follows it, left-padded to R
    tokens (the padding sits between the two parts, masked out). On 256 held-out arithmetic
    questions this cuts the prefill to a third. Not for sliding-window models (Gemma 3):
    their window is taken on slots, which the padding would shift.
    Sets key_ok (B, S): True at the prompt's real tokens and from `end` on. Returns the
    next-token logits (B, V), the next position of each row (B,), and whether any slot
    before `end` is padding.
    """
    dev, B = model.device, len(prompts)
    uniq = list(dict.fromkeys(map(tuple, prompts)))
    row_of = {p: i for i, p in enumerate(uniq)}
    inverse = torch.tensor([row_of[tuple(p)] for p in prompts], device=dev)  # (B,) the distinct prompt of each row
    sliding = any(getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers)
    C = common_prefix(uniq) if len(uniq) > 1 and not sliding else 0
    R = max(len(p) for p in uniq) - C
    off = end - C - R  # the slots before the part written: padding up to the call's longest prompt
    cache = [(K[:, :, off:], V[:, :, off:]) for K, V in cache]
    if C:  # the shared prefix, once, then copied to every distinct prompt's row
        prefix = torch.tensor([uniq[0][:C]], device=dev)  # (1, C)
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()[None, None]  # (1, 1, C, C)
        forward(model, prefix, torch.arange(C, device=dev)[None], cache, torch.arange(C, device=dev), C, causal,
                packed, sdpa)
        for K, V in cache:
            K[1:len(uniq), :, :C], V[1:len(uniq), :, :C] = K[:1, :, :C], V[:1, :, :C]
    ids = torch.tensor([[pad_token_id] * (R - len(p) + C) + list(p[C:]) for p in uniq], device=dev)  # (U, R)
    # (U, R) real tokens
    ok = torch.arange(R, device=dev) >= torch.tensor([R - len(p) + C for p in uniq], device=dev)[:, None]
    pos = C + (ok.cumsum(-1) - 1).clamp(min=0)  # (U, R) positions continue after the prefix
    causal = torch.ones(R, R, dtype=torch.bool, device=dev).tril()
    # (U, R, C+R): the prefix, then the real rest; pad rows see themselves
    visible = torch.cat([torch.ones(len(uniq), R, C, dtype=torch.bool, device=dev),
                         (ok[:, None, :] & causal) | torch.eye(R, dtype=torch.bool, device=dev)], -1)
    logits = forward(model, ids, pos, cache, torch.arange(C, C + R, device=dev), C + R, visible[:, None],
                     packed, sdpa)[inverse]  # (B, V)
    if len(uniq) < B:
        for K, V in cache:
            # (B, Hkv, C+R, hd) from the U prefilled rows
            K[:, :, :C + R], V[:, :, :C + R] = K[inverse, :, :C + R], V[inverse, :, :C + R]
    key_ok[:, :off], key_ok[:, off:end - R], key_ok[:, end - R:end], key_ok[:, end:] = False, True, ok[inverse], True
    return logits, pos[inverse, -1] + 1, off > 0 or not bool(ok.all())
