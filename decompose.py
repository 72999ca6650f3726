"""Internal policies of a causal LM: the residual-stream decomposition of BuPO, Sec. 1.

Tan et al., "Bottom-up Policy Optimization: Your Language Model Policy Secretly
Contains Internal Policies", arXiv 2512.19673. A pre-norm decoder keeps a residual
stream h_l = h_{l-1} + A_l + F_l, so the last residual is exactly

    h_L = h_0 + sum_l A_l + sum_l F_l                     (paper, Eq. for h_L)

and any residual-width vector x becomes a policy through the unembedding:
pi(x) = softmax(x E_u^T). The internal layer policy is pi(h_l); the internal modular
policies are pi(A_l) and pi(F_l). The paper (and the authors' code) unembed the raw
residual; the usual "logit lens" applies the model's final norm first. Both are here.

This file captures the residual increments with forward hooks on the unmodified
Hugging Face model (loaded by models.py), unembeds them, and holds the entropy formula
H(pi) of a policy. It does not measure entropies over a run (entropy.py) or train (bupo.py).

    python decompose.py [--model smollm2|gemma3-270m|DIR|HUB_ID] [--prompt "What is 12 + 7?"]
"""
import argparse
import contextlib
from dataclasses import dataclass

import torch

from cli import InputError, run_main
from models import EMBEDDED, load_model
from problems import prompt_ids


# ----------------------------------------------------------------------------- hooks

def is_sandwich(layer):
    """Gemma-style blocks norm each module's output before adding it to the residual."""
    return hasattr(layer, "pre_feedforward_layernorm")


def capture(model, fn):
    """Context manager: call fn(kind, l, x) with each residual-stream quantity of a forward pass.

    kinds, each (B, T, D): "embed" (input of layer 0, as hidden_states[0]); per layer l:
    "attn_in" (input_layernorm output), "attn" (the residual increment A_l), "ffn_in"
    (the MLP's input), "ffn" (the increment F_l), "layer" (the layer output h_{l+1}).
    For sandwich (Gemma) blocks the increments are the post-normed module outputs.
    Only forward hooks: the Hugging Face model itself is not modified.
    """
    handles = []
    first = lambda out: out[0] if isinstance(out, tuple) else out
    layers = model.model.layers

    def embed_hook(mod, args, kwargs):
        fn("embed", 0, args[0] if args else kwargs["hidden_states"])
    handles.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for l, layer in enumerate(layers):
        sandwich = is_sandwich(layer)
        attn_mod = layer.post_attention_layernorm if sandwich else layer.self_attn
        ffn_mod = layer.post_feedforward_layernorm if sandwich else layer.mlp
        hooks = [(layer.input_layernorm, "attn_in"), (attn_mod, "attn"), (ffn_mod, "ffn"), (layer, "layer")]
        for mod, kind in hooks:
            handles.append(mod.register_forward_hook(lambda m, a, out, kind=kind, l=l: fn(kind, l, first(out))))
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, args, l=l: fn("ffn_in", l, args[0])))
    return _removing(handles)


@contextlib.contextmanager
def _removing(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- decomposition

@dataclass
class Decomposition:
    embed: torch.Tensor  # (B, T, D) h_0, the residual stream's input
    attn: torch.Tensor   # (L, B, T, D) A_l, what attention block l adds
    ffn: torch.Tensor    # (L, B, T, D) F_l, what FFN block l adds

    @property
    def num_layers(self):
        return self.attn.shape[0]

    def hidden(self, l):
        """h_l = h_0 + sum_{j<l} (A_j + F_j), summed in the model's own order (bit-exact)."""
        if not 0 <= l <= self.num_layers:
            raise IndexError(f"layer index {l} out of range 0..{self.num_layers}")
        h = self.embed
        for j in range(l):
            h = h + self.attn[j]
            h = h + self.ffn[j]
        return h


def check_inputs(model, input_ids, attention_mask=None):
    """Clear errors for ids that would fail deep inside torch."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InputError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
    V, n_ctx = model.config.vocab_size, getattr(model.config, "max_position_embeddings", None)
    if input_ids.min() < 0 or input_ids.max() >= V:
        raise InputError(f"token ids must lie in 0..{V - 1} (the vocabulary), got {input_ids.min()}..{input_ids.max()}")
    if n_ctx and input_ids.shape[1] > n_ctx:
        raise InputError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's context ({n_ctx})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} "
                         f"!= input_ids shape {tuple(input_ids.shape)}")


@torch.no_grad()
def decompose(model, input_ids, attention_mask=None):
    """Split the residual stream of one forward pass into h_0, A_l and F_l (paper Sec. 1)."""
    check_inputs(model, input_ids, attention_mask)
    got = {"embed": [], "attn": [], "ffn": []}
    keep = lambda kind, l, x: got[kind].append(x.detach()) if kind in got else None
    with capture(model, keep):
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return Decomposition(got["embed"][0], torch.stack(got["attn"]), torch.stack(got["ffn"]))


def unembed(model, x, final_norm=False):
    """Logits (..., V) of residual-width vectors x (..., D): lm_head(x), or lm_head(norm(x)).

    final_norm=False is the paper's convention (raw residual, as the authors' code);
    True is the usual logit lens. Gemma's final logit soft-capping is applied if set.
    """
    if final_norm:
        x = model.model.norm(x)
    return softcap(model, model.lm_head(x))


def softcap(model, logits):
    """Gemma's final logit soft-capping, cap * tanh(logits / cap), where the config sets one."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# ----------------------------------------------------------------------------- entropy of a policy

def entropy(logits):
    """Entropy in nats over the last dim, in float32; -inf logits contribute 0 (no NaN)."""
    return entropy_of_logp(logits.float().log_softmax(-1))


def entropy_of_logp(logp):
    """-sum_v p_v log p_v from log-probs (..., V); -inf entries contribute 0."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; default: smollm2)")
    p.add_argument("--prompt", default="What is 12 + 7?", help="user turn to decompose")
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    ids = torch.tensor(prompt_ids(tok, [{"messages": [{"role": "user", "content": args.prompt}]}]))
    check_inputs(model, ids)
    d = decompose(model, ids)
    L = d.num_layers
    logits = model(ids).logits
    err = (unembed(model, d.hidden(L), final_norm=True) - logits).abs().max().item()
    print(f"{L} layers; max |lm_head(norm(h_0 + sum A + sum F)) - logits| = {err:.2e}")
    print("top next token of each internal layer policy: raw residual (paper) | final norm (logit lens)")
    for l in range(L + 1):
        raw, lens = (unembed(model, d.hidden(l)[0, -1], final_norm=fn or l == L).argmax().item()
                     for fn in (False, True))
        print(f"  layer {l:2d}: {tok.decode([raw])!r:>16} | {tok.decode([lens])!r}")


if __name__ == "__main__":
    run_main(main)
