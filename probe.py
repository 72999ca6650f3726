"""Feature refinement during training (BuPO Fig. 5): does the optimized layer take on the top layers' features?

Tan et al., arXiv 2512.19673, Sec. 5 (since v2): optimizing pi_k makes h_k carry
high-level features early. A probe measures it on a fixed probe set, responses sampled
once from the start model to held-out questions (the same for every method and seed, so
that each curve has a control), over the positions that produce the response tokens:

  (a) cos(h_k, h_j) for each later layer j > k (raw residuals, token mean);
  (b) dH_k = H(pi_k) - H(pi_{k-1}), pi_{-1} being the embedding's policy;
  (c) the perplexity of the output policy on the probe responses;
  (d) KL(pi_k || pi_j) for each later layer j (token mean; pi_{L-1} is the output policy).

pi_l = softmax(lm_head(h_l)) on the raw residual (the paper's convention; the last layer
with the model's final norm), at temperature 1, in float32. One hooked forward pass and
L - k + 1 unembeddings per response token, chunked by a memory budget: on this CPU 2.5-3 s
for 4 responses of the default model (64 tokens, k=4), under 20% of a 15-s training step.
"""
import math

import torch

from decompose import capture, check_inputs, entropy_of_logp, unembed
from policy import LOGITS_BUDGET, chunk_rows, check_layer, pad_rows
from problems import prompt_ids, task_problems
from rollout import generate

CHUNK_BUDGET = LOGITS_BUDGET // 8  # float32 logits per chunk: pi_k's log-probs, pi_j's, and their temporaries


def probe_set(model, tok, eval_data, n, max_new_tokens, dtype=None):
    """{"prompts", "responses"} (token ids): one response to each of the first n questions of the first held-out
    set, sampled at temperature 1 with seed 0 from `model` (the start model), with rollout.generate's `dtype` copy."""
    problems = task_problems(eval_data.split(",")[0], n, 0, "test")
    prompts = prompt_ids(tok, problems)
    r = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, seed=0, dtype=dtype)
    return {"prompts": prompts, "responses": [t[:n] for t, n in zip(r.tokens.tolist(), r.lengths.tolist())]}


def _logits(model, h, last):
    """Logits (N, V) of pi(h) in float32; `last`: the output policy, with the model's final norm."""
    return unembed(model, h.float(), final_norm=last).float()


@torch.no_grad()
def probe(model, probes, k, pad_id=0):
    """Fig. 5's four measures of layer k on the probe set (probe_set's dict):
    {"cos": [cos(h_k, h_j) for j = k+1..L-1], "dH": dH_k, "ppl": output-policy perplexity, "kl": [KL(pi_k || pi_j)]}.

    KL(pi_k || pi_j) = -H(pi_k) - p_k . z_j + logsumexp(z_j) for logits z_j: one matmul, one log-softmax and one
    row dot per later layer, no (N, V) products."""
    L = model.config.num_hidden_layers
    check_layer(model.config, k)
    ids, att, resp = pad_rows(probes["prompts"], probes["responses"], pad_id, model.device)
    check_inputs(model, ids, att)
    pos = torch.zeros_like(resp)
    pos[:, :-1] = resp[:, 1:]  # position t produces token t+1
    targets = ids[:, 1:][pos[:, :-1]]  # (N,) the response tokens
    if targets.numel() == 0:
        raise ValueError("the probe set holds no response token: nothing to measure")
    h = {}

    def on(kind, l, x):  # keep the residuals the probe reads: h_{k-1} (or the embedding), h_k, ..., h_{L-1}
        if kind == "embed" and k == 0 or kind == "layer" and l >= k - 1:
            h[l if kind == "layer" else -1] = x[pos].float()
    with torch.autocast(model.device.type, enabled=False), capture(model, on):
        model.model(input_ids=ids, attention_mask=att, use_cache=False)
    later = range(k + 1, L)
    cos = [torch.cosine_similarity(h[k].double(), h[j].double(), dim=-1).mean().item() for j in later]
    n, chunk = targets.numel(), chunk_rows(model.config.vocab_size, CHUNK_BUDGET)
    dh, nll, kl = 0.0, 0.0, torch.zeros(len(later), dtype=torch.float64)
    for i in range(0, n, chunk):
        s = slice(i, i + chunk)
        lp_k = _logits(model, h[k][s], k == L - 1).log_softmax(-1)
        ent_k = entropy_of_logp(lp_k)
        dh += (ent_k - entropy_of_logp(_logits(model, h[k - 1][s], False).log_softmax(-1))).double().sum().item()
        p_k = lp_k.exp()
        for idx, j in enumerate(later):
            z = _logits(model, h[j][s], j == L - 1)
            lse = z[:, 0] - z.log_softmax(-1)[:, 0]  # 4x faster than torch.logsumexp on this CPU
            kl[idx] += (lse - ent_k - torch.einsum("nv,nv->n", p_k, z)).double().sum()
        z_out, lse_out = (lp_k, 0.0) if k == L - 1 else (z, lse)
        nll -= (z_out.gather(-1, targets[s, None])[:, 0] - lse_out).double().sum().item()
    return {"cos": cos, "dH": dh / n, "ppl": math.exp(nll / n), "kl": (kl / n).tolist()}
