"""From next-token logits to tokens: temperature, top-k and top-p, and inverse-CDF draws.

rollout.py samples with these; a row's token depends only on its logits and its own
uniform draw, so the tokens of a prompt do not depend on the batch it is sampled in.
Sampling follows verl/vLLM: the returned log-prob of a token is under the distribution it
was sampled from after temperature and before top-k/top-p truncation.
"""
import torch


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
    (unused when temperature is 0: greedy, log-probs reported at temperature 1).
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logp = (logits if temperature == 1 else logits / temperature).log_softmax(-1)  # (B, V)
    probs = filter_logits(logp, top_k, top_p).softmax(-1) if top_k or top_p < 1 else logp.exp()
    cdf = probs.cumsum(-1)  # (B, V)
    # zero-mass tokens never hit
    tok = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]
