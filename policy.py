"""Policies of a causal LM over a batch of responses: the output policy and BuPO's internal layer policy.

A policy is a function with one signature, which grpo.py optimizes whatever it is:

    policy(model, input_ids, attention_mask, temperature, mask) -> (logprobs, entropies)

    input_ids, attention_mask, mask: (B, T), prompt + response rows, right-padded;
        mask is the response mask: True where input_ids[b, t] is a response token
        (the one convention of this project: every (B, T) tensor is aligned with the tokens).
    logprobs[b, t] = log pi(input_ids[b, t] | input_ids[b, :t]) of the temperature-scaled policy,
    entropies[b, t] = H(pi(. | input_ids[b, :t])); both (B, T), 0 where mask is False.

Two policies (Tan et al., arXiv 2512.19673):
- output_policy: the model's own, softmax(lm_head(norm(h_L)) / T)               (GRPO)
- layer_policy(k): the internal layer policy pi_k = softmax(lm_head(h_k) / T), h_k the raw
  residual after decoder layer k (0-indexed; the authors' hidden_states[k+1], no final
  norm). Layers above k never run (early exit), so only layers <= k, the embeddings and
  the lm_head get gradients                                                     (BuPO, Sec. 3)

The unembedding is the costly part (V = 49k-262k columns): only response positions are
unembedded, in chunks sized by a memory budget, each chunk checkpointed only when the
budget needs more than one. Entropies carry no gradient unless asked (an entropy bonus).
"""
import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from cli import InputError
from decompose import check_inputs, unembed

LOGITS_BUDGET = 1 << 30  # bytes of float32 logits materialized at once (a chunk of rows x V)
# devices where residuals() runs a group's prompt once (FLOPs bound); a GPU runs one forward per micro-batch
SHARE_PROMPTS = ("cpu",)
PRECISIONS = ("float32", "bfloat16")
LOGP_FLOOR = -1e30  # a -inf logit's log-prob in TokenLogprobs: exp gives 0, and times a gradient it stays finite


def chunk_rows(vocab_size, budget=None):
    """Rows of (rows, V) float32 logits that fit the budget (default LOGITS_BUDGET)."""
    return max(1, (budget or LOGITS_BUDGET) // (4 * vocab_size))


def compute_precision(precision, device):
    """The context of a policy's forward and backward: bf16 autocast (float32 weights stay the masters) or float32.

    Log-softmax, entropies and the PPO ratio are computed in float32 either way (logits are cast up first).
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- batches

def pad_rows(prompts, responses, pad_id, device=None):
    """Right-padded rows of prompt + response token lists: input_ids, attention_mask, response mask, each (B, T)."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    resp = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)], att[i, :len(r)], resp[i, len(p):len(r)] = torch.tensor(r), 1, True
    return ids.to(device), att.to(device), resp.to(device)


@dataclass
class Batch:
    input_ids: torch.Tensor       # (N, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor   # (N, T) True at response tokens (policy.py's convention)
    advantages: torch.Tensor      # (N,) one per response, or (N, T) per token (PPO's GAE, Reinforce++)
    lengths: tuple = None         # ([row length], [response length]) on the host; read from the masks once if None

    def host_lengths(self):
        """(row lengths, response lengths), lists of N ints: what micro-batching needs, without waiting for the
        device."""
        if self.lengths is None:
            # one host sync
            self.lengths = tuple(torch.stack([self.attention_mask.sum(1), self.response_mask.sum(1)]).tolist())
        return self.lengths


def micro_slices(batch, idx, size, tokens=None):
    """Micro-batches of rows idx (in order), each of at most `size` rows and `tokens` tokens (rows x its longest row:
    the padded (n, T) a forward runs; a longer row goes alone), trimmed to its longest row: (rows, ids, att, resp, adv),
    adv (n,) or (n, T). Lengths come from the host (batch.host_lengths); consecutive rows are sliced, not gathered,
    so no micro-batch waits for the device."""
    lengths = batch.host_lengths()[0]
    idx = idx.tolist() if torch.is_tensor(idx) else list(idx)
    start, budget = 0, tokens or float("inf")
    while start < len(idx):
        end, T = start + 1, lengths[idx[start]]
        while end < len(idx) and end - start < size and (end - start + 1) * max(T, lengths[idx[end]]) <= budget:
            T, end = max(T, lengths[idx[end]]), end + 1
        j = row_index(idx[start:end])
        adv = batch.advantages[j] if batch.advantages.dim() == 1 else batch.advantages[j, :T]
        yield j, batch.input_ids[j, :T], batch.attention_mask[j, :T], batch.response_mask[j, :T], adv
        start = end


def row_index(rows):
    """A slice for consecutive rows (a view: no index copied to the device), else the list."""
    return slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows


def scored_count(batch, j):
    """Response tokens of rows j (a slice or list), from the host lengths: policies score as many positions."""
    resp = batch.host_lengths()[1]
    return sum(resp[j] if isinstance(j, slice) else [resp[i] for i in j])


def update_slices(batch, rows, mini, micro, tokens=None):
    """micro_slices of `rows`, cut at the mini-batch boundaries (multiples of `mini` rows) first: the micro-batches
    that the update runs, so that a no-grad pass over them (old log-probs, old values) computes, under bf16 too,
    exactly what the update's first forward computes (ratio 1 before any update)."""
    rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
    for m in range(0, batch.input_ids.shape[0], mini):
        idx = [r for r in rows if m <= r < m + mini]
        yield from micro_slices(batch, idx, micro, tokens) if idx else ()


# ----------------------------------------------------------------------------- log-probs

class TokenLogprobs(torch.autograd.Function):
    """Target log-probs and entropies (c,) of softmax(logits / T) in one float32 pass over the logits (c, V).

    Fused by hand: the forward keeps only the logits (in their dtype: bf16 under autocast)
    and the rows' log-sum-exps, and the backward rebuilds the softmax from them, so autograd
    holds no (c, V) float32 intermediates. With z = logits / T, p = softmax(z):
    d log p_t / dz = onehot(t) - p,  dH / dz = -p (log p + H).
    """
    @staticmethod
    def forward(ctx, logits, targets, temperature, entropy_grad):
        logp = _scaled(logits, temperature)  # (c, V) float32, a copy
        lse = logp.logsumexp(-1)  # (c,)
        logp.sub_(lse[:, None]).clamp_(min=LOGP_FLOOR)  # log p (c, V); a -inf logit contributes 0 below
        ent = -(logp.exp() * logp).sum(-1)  # (c,) -sum_v p_v log p_v; not vecdot, which autocast would run in bf16
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.entropy_grad = temperature, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp.gather(1, targets[:, None])[:, 0], ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        logp = _scaled(logits, ctx.temperature).sub_(lse[:, None]).clamp_(min=LOGP_FLOOR)  # (c, V)
        p = logp.exp()  # (c, V)
        w = (logp.add_(ent[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None]) if ctx.entropy_grad
             else g_lp[:, None])  # (c, V) or (c, 1)
        # g_lp (onehot - p) - g_ent p (log p + H)
        grad = p.mul_(w).neg_().scatter_add_(1, targets[:, None], g_lp[:, None])
        return (grad.div_(ctx.temperature) if ctx.temperature != 1 else grad).to(logits.dtype), None, None, None


def _scaled(logits, temperature):
    """logits / temperature as a new float32 tensor (c, V)."""
    z = logits.to(torch.float32, copy=True)
    return z.div_(temperature) if temperature != 1 else z


def _chunk(model, h, targets, temperature, final_norm, entropy_grad):
    logits = unembed(model, h, final_norm)  # (c, V), bf16 under autocast; TokenLogprobs works in float32
    return TokenLogprobs.apply(logits, targets, temperature, entropy_grad and torch.is_grad_enabled())


def scored_positions(mask, n=None):
    """Flat indices into (B, T-1) of the positions whose next token is scored (mask[:, 1:] True), in order.

    n, their count, when the caller knows it (update.py, from the batch's lengths on the host): then nothing here waits
    for the device (a stable sort instead of nonzero); without it, one host sync counts them."""
    pos = mask[:, 1:].bool().flatten()  # (B*(T-1),)
    n = int(pos.sum()) if n is None else n
    return (~pos).to(torch.uint8).argsort(stable=True)[:n]  # (n,): the True positions first, in their order


def logprobs_from_hidden(model, h, input_ids, mask, temperature=1.0, final_norm=False, entropy_grad=False,
                         n_scored=None):
    """Log-probs and entropies (B, T) of pi(h) = softmax(unembed(h) / temperature), token-aligned as a policy's.

    h: residuals (B, T, D); position t-1 produces token t. Only tokens where mask is True
    are scored (n_scored of them, if known: see scored_positions); the (n, V) logits are
    built in chunks of chunk_rows(V), under activation checkpointing when there is more
    than one chunk (so one chunk's logits exist at a time in the backward pass too); a
    single chunk keeps its logits for the backward instead of running the lm_head twice.
    """
    B, T, D = h.shape
    idx = scored_positions(mask, n_scored)  # (n,) into (B, T-1)
    b, t = idx // max(T - 1, 1), idx % max(T - 1, 1)  # (n,), (n,): position t of row b produces token t+1
    flat, targets = h.reshape(B * T, D)[b * T + t], input_ids[b, t + 1]  # (n, D), (n,)
    c = chunk_rows(model.config.vocab_size)
    parts = []
    for i in range(0, flat.shape[0], c):
        args = (model, flat[i:i + c], targets[i:i + c], temperature, final_norm, entropy_grad)
        many = flat.shape[0] > c and torch.is_grad_enabled()
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if many else _chunk(*args))
    logp, ent = ((torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts)) if parts
                 else (flat.new_zeros(0, dtype=torch.float),) * 2)
    # token t+1's
    full = lambda v: torch.zeros(B * T, dtype=v.dtype, device=h.device).index_put((b * T + t + 1,), v).view(B, T)
    return full(logp), full(ent)


def output_policy(model, input_ids, attention_mask, temperature=1.0, mask=None, entropy_grad=False, n_scored=None):
    """The model's output policy (what GRPO optimizes); mask None scores every token after the first.
    n_scored: the count of scored tokens where the caller knows it (the trainer, from its batch's host lengths);
    then nothing waits for the device, and the ids (its own rollout's) are not range-checked again.

    verl divides the logits by the rollout temperature here too, so that old and new
    log-probs are those of the distribution the tokens were sampled from.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
    h = residuals(model, input_ids, attention_mask, mask, trusted=n_scored is not None)  # (B, T, D), final-normed
    return logprobs_from_hidden(model, h, input_ids, mask, temperature, False, entropy_grad, n_scored)


def residuals(model, input_ids, attention_mask, mask, k=None, trusted=False):
    """The residual stream (B, T, D) where it produces the response tokens: after the last layer, final-normed
    (k None), or the raw residual after layer k, whose layers above never run (early exit).

    On a GPU this is one forward of the whole micro-batch: its cost is the kernels it
    launches, not its FLOPs. On the CPU, which is bound by FLOPs, a GRPO group's prompt
    (repeated G times) runs once, and its keys and values (with their gradients) serve all
    its rows, as rollout.py's prefill does: on the CPU preset (50-token prompts, ~30-token
    answers) that halves the tokens of an update, for two forwards per group. Positions
    before the last prompt token are then not computed (zeros): no response token reads
    them. Rows that share no prompt, or activation checkpointing (which drops the cache)
    and rows without a response take the one plain forward too.

    trusted: the trainer's own rows (policy_logprobs, ppo_update), right-padded by pad_rows. Their
    ids are not range-checked again, and the plain forward gets no attention mask but an empty
    cache: with right padding the causal mask alone gives every real token its result (pads come
    after it), and Hugging Face, given a mask (or none and no cache), reads it (or the positions)
    back to the host to choose SDPA's kernel: a sync per forward.
    """
    if k is not None:
        check_layer(model.config, k)
    if not trusted:
        check_inputs(model, input_ids, attention_mask)
    B, T = input_ids.shape
    checkpointing = (model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                     else model.is_gradient_checkpointing)
    groups = None if checkpointing else prompt_groups(input_ids, mask)
    if groups is None:
        if trusted:
            return _forward(model, input_ids, None, k, cache=DynamicCache(config=model.config))  # no mask to read back
        return _forward(model, input_ids, attention_mask, k)
    h = None
    for prompt, rows in groups.items():
        P, rows = len(prompt), torch.tensor(rows, device=input_ids.device)
        end = int(attention_mask[rows].sum(1).max())  # the group's longest row
        cache = DynamicCache(config=model.config)
        # (1, 1, D): produces the first response token
        h_prompt = _forward(model, input_ids[rows[:1], :P], None, k, cache=cache)[:, -1:]
        cache.batch_repeat_interleave(len(rows))  # (n, ...) views of one prompt's keys and values, gradients included
        att = torch.cat([attention_mask.new_ones(len(rows), P), attention_mask[rows, P:end]], 1)  # (n, end)
        pos = torch.arange(P, end, device=input_ids.device).expand(len(rows), -1)  # (n, end-P)
        h_resp = _forward(model, input_ids[rows, P:end], att, k, cache=cache, position_ids=pos)  # (n, end-P, D)
        h = h if h is not None else h_resp.new_zeros(B, T, h_resp.shape[-1])
        h = h.index_put((rows[:, None], torch.arange(P - 1, end, device=h.device)),
                        torch.cat([h_prompt.expand(len(rows), -1, -1), h_resp], 1))
    return h


def prompt_groups(input_ids, mask):
    """{prompt tuple: rows} for residuals() to run each prompt once, or None where one plain forward is run:
    no two rows share a prompt, a row has no response or no prompt, or the device is not in SHARE_PROMPTS."""
    B, T = input_ids.shape
    if input_ids.device.type not in SHARE_PROMPTS:
        return None
    starts = torch.where(mask.any(1), mask.int().argmax(1), T).tolist()  # (B,) first response token of each row
    groups = {}
    for i, p in enumerate(starts):
        groups.setdefault(tuple(input_ids[i, :p].tolist()), []).append(i)
    return None if len(groups) == B or min(starts) < 1 or max(starts) == T else groups


def decoder_tokens(input_ids, attention_mask, mask):
    """Token positions the decoder runs in residuals() (its FLOP count): each distinct prompt once, or the whole
    batch."""
    groups = prompt_groups(input_ids, mask)
    if groups is None:
        return input_ids.numel()
    return sum(len(p) + len(rows) * (int(attention_mask[rows].sum(1).max()) - len(p)) for p, rows in groups.items())


def _forward(model, input_ids, attention_mask, k=None, cache=None, position_ids=None):
    """model.model's last hidden state (final-normed), or with k the raw residual after layer k (early exit);
    with a cache, its keys and values are read and extended."""
    # renamed in transformers 5.2x
    cache_arg = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, cache_arg: cache,
          "use_cache": cache is not None}
    if k is None:
        return model.model(**kw).last_hidden_state

    def stop(module, args, out):
        raise _EarlyExit(out[0] if isinstance(out, tuple) else out)
    handle = model.model.layers[k].register_forward_hook(stop)
    try:
        model.model(**kw)
    except _EarlyExit as e:
        return e.h
    finally:
        handle.remove()
    raise RuntimeError("the early-exit hook never fired")


class _EarlyExit(Exception):
    def __init__(self, h):
        self.h = h


def check_layer(model_config, k):
    """k must name an internal layer: 0..L-2 (L-1 is the last layer, whose policy GRPO trains)."""
    L = model_config.num_hidden_layers
    if not 0 <= k <= L - 2:
        raise InputError(f"internal layer k={k} out of range: use 0..{L - 2} for this {L}-layer model "
                         f"(k={L - 1} is the last layer, whose policy GRPO already trains)")


def layer_logprobs(model, input_ids, attention_mask, k, temperature=1.0, mask=None, entropy_grad=False,
                   final_norm=False, n_scored=None):
    """Log-probs and entropies (B, T) under pi_k = softmax(lm_head(h_k) / T); mask None scores every token after the
    first.

    final_norm=True applies the model's final norm to h_k first (the logit-lens convention;
    the paper's Table 5 ablation); the paper's BuPO uses the raw residual.
    Precision: layers 0..k always run in float32, also inside a bf16 autocast; the lm_head
    runs under the caller's autocast (a bf16 GEMM in the bf16 update) and the log-softmax in
    float32 (TokenLogprobs). The raw residual's norm makes pi_k's logits hundreds of nats
    wide; measured on the default model (layer 4, 1024 tokens, one Adam-sized weight step), the
    bf16 noise on the PPO log-ratio puts 34% of the tokens outside the clip range with the layers
    in bf16 too, 20% with only the layers in bf16, 4.7% with only the lm_head (this choice), 0%
    in float32 (README, "Precision"; `--precision float32` keeps all of pi_k float32).
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
    with torch.autocast(input_ids.device.type, enabled=False):
        h = residuals(model, input_ids, attention_mask, mask, k, trusted=n_scored is not None)  # (B, T, D) float32
    return logprobs_from_hidden(model, h, input_ids, mask, temperature, final_norm, entropy_grad, n_scored)


def layer_policy(k, final_norm=False):
    """The policy fn of pi_k (BuPO's first phase); final_norm: the logit-lens variant (Table 5)."""
    def policy(model, input_ids, attention_mask, temperature=1.0, mask=None, entropy_grad=False, n_scored=None):
        return layer_logprobs(model, input_ids, attention_mask, k, temperature, mask, entropy_grad, final_norm,
                              n_scored)
    policy.layer, policy.final_norm = k, final_norm
    return policy


def upper_parameters(named_parameters, k):
    """Names of the parameters above layer k: decoder layers k+1.. and the final norm, which pi_k never reaches
    (Table 11's layer-aware controls train them frozen or slower). Works on wrapped names (DDP, Wrapped)."""
    out = []
    for name, _ in named_parameters:
        parts = name.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            if int(parts[parts.index("layers") + 1]) > k:
                out.append(name)
        elif parts[-2:] == ["norm", "weight"] or parts[-2:] == ["norm", "bias"]:
            out.append(name)
    return out
