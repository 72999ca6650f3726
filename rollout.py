"""Batched sampling with a KV cache, written by hand: the engine behind every training sample.

GRPO and BuPO (arXiv 2512.19673, Sec. 3) spend most of their time sampling groups of
responses. This file does it without `model.generate`, with the decoder layers' own
modules and weights doing the math:

- prefill: each distinct prompt runs once (a GRPO group repeats it), left-padded, and
  only its last position is unembedded;
- decode (decode.py): one static step per token on fixed buffers, a KV cache of [rows,
  kv_heads, slots, head_dim] per layer, the uniform draws of every step drawn up front;
- continuous batching: finished rows are moved out (compaction) and, when there are more
  prompts than rows (max_batch), waiting prompts are prefilled into the freed rows and
  decode beside the others, each at its own step, drawing its own uniforms;
- on CUDA the step is captured once per (batch bucket, cache span of 128 slots) as a CUDA
  graph, the live rows padded to the bucket (1, 2, 4, ..., as nano-vllm), and replayed;
  torch.compile of its forward is opt-in (`compile=True`, `--compile`); each falls back,
  with one warning line, when it fails (graphs.py); buffers and graphs are kept across
  calls (decode.release() frees them); the host reads the GPU only every `sync_every`
  steps, to stop, compact and refill; attention is SDPA on the query groups folded into the
  query length (fused kernels; `attention="eager"` writes it out, the CPU default);
- on CPU the same step runs eagerly on exactly the live rows and the filled part of the
  cache, with every linear weight packed once into oneDNN's layout (what torch.compile
  uses): a decode step's small-M products run ~2x faster so.

Sampling (temperature, top-k/top-p, inverse-CDF draws) is sampling.py's.

    python rollout.py --prompt "What is 12 + 7?"               # one answer, greedily
    python bench.py rollout                                     # ours vs HF generate (bench_rollout.py)
    .ci/gpu-check                                               # everything a lent GPU should tell, in one run
"""
import argparse
from dataclasses import dataclass

import torch

from cli import InputError, check, run_main
from models import EMBEDDED, load_model
from decode import decode, decoder, sampling_copy
from kvcache import pack_linears
from problems import prompt_ids


@dataclass
class Rollout:
    tokens: torch.Tensor    # (B, N) sampled ids, pad_token_id after the end
    logprobs: torch.Tensor  # (B, N) log-prob of each token under the sampling distribution, 0 after the end
    lengths: torch.Tensor   # (B,) tokens generated, the EOS token included
    finished: torch.Tensor  # (B,) True where EOS was hit
    setup_s: float = 0.0    # this call's seconds compiling and capturing CUDA graphs (once per shape), not sampling
    mode: str = "eager"     # the step's path at the call's end: graphs+compile, graphs, compile or eager (graphs.py)


# ----------------------------------------------------------------------------- generate

def check_args(model, prompts, max_new_tokens, temperature, top_p, top_k):
    check(len(prompts) > 0, "prompts is empty: pass a list of token-id lists")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    check(not empty, f"prompt {empty[0] if empty else 0} is empty: every prompt needs at least one token")
    n_ctx, longest = getattr(model.config, "max_position_embeddings", None), max(len(p) for p in prompts)
    check(not n_ctx or longest + max_new_tokens <= n_ctx,
          f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
          f"exceeds the model's context of {n_ctx}; shorten the prompt or lower max_new_tokens")
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check(0 <= temperature < float("inf"), f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    check(0 < top_p <= 1, f"top_p must lie in (0, 1], got {top_p}")
    check(top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}")
    check(not getattr(model.config, "attn_logit_softcapping", None),
          "attention logit soft-capping (Gemma 2) is not supported by rollout.py")


ATTENTION = ("sdpa", "eager")
# the process's: set by the CLIs that sample (configure), read by generate
DEFAULTS = dict(compile=False, attention=None)


def configure(compile=False, attention=""):
    """The process's sampling defaults, from a CLI's --compile and --attention, for every generate call that does not
    name them (those inside grpo.py's steps and evaluations included)."""
    check(attention in ("",) + ATTENTION,
          f"--attention must be sdpa or eager (default: sdpa on CUDA, eager on CPU), got '{attention}'")
    DEFAULTS.update(compile=bool(compile), attention=attention or None)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=0,
             seed=None, dtype=None, batch_index=None, batch_rows=None, max_batch=0, static=None, graphs=None,
             compile=None, attention=None, pack=True, sync_every=8, on_done=None):
    """Sample a response for each prompt (a list of token-id lists of any lengths).

    dtype: sample with a copy of the weights in dtype (e.g. torch.bfloat16) while the
    caller keeps training in float32, kept and refreshed in place across calls; None
    samples with the model as it is.
    batch_index, batch_rows: prompt i is row batch_index[i] of a batch of batch_rows
    sampled with the same seed, and gets the random draws it would get there (the
    uniforms are drawn up front, (max_new_tokens, batch_rows), and prompt i reads column
    batch_index[i]), so a batch split across processes samples what one process would.
    max_batch: decode at most this many prompts at a time (0 = all at once), which bounds
    the KV cache; a row that finishes takes the next waiting prompt (continuous batching),
    and by the same per-row draws the tokens do not depend on it. on_done(m): told each
    time the host moves m finished prompts out (a progress bar's update).
    static: run the decode step with static shapes, the live rows padded to a bucket and
    the cache attended over spans of decode.SPAN slots, the host checking for stops every
    sync_every steps (the default on CUDA, and with compile or graphs); its buffers (and graphs) are kept for the next
    call with the same model and sampling settings (decode.py).
    graphs: capture the static step as CUDA graphs and replay them (default: on CUDA with
    static shapes). compile: run the decoder forward through torch.compile, sampling left
    eager (opt-in; refused on a torch with pytorch/pytorch#180221). Each falls back with
    one warning line when it fails (graphs.py). None: the process's default (configure).
    attention: "sdpa" (one fused call; the default on CUDA) or "eager" (written out; the
    default on CPU). pack: oneDNN-packed weights on CPU (False runs the modules as they
    are, the path CUDA takes).
    Returns a Rollout with tensors on the model's device.
    """
    check_args(model, prompts, max_new_tokens, temperature, top_p, top_k)
    index = torch.arange(len(prompts)) if batch_index is None else torch.as_tensor(batch_index)  # (B,)
    batch_rows = batch_rows or len(prompts)
    if (len(index) != len(prompts) or int(index.min()) < 0 or int(index.max()) >= batch_rows
            or len(set(index.tolist())) < len(index)):
        raise InputError(f"batch_index must be {len(prompts)} distinct rows in 0..{batch_rows - 1} (batch_rows), "
                         "one per prompt")
    cuda = model.device.type == "cuda"
    compile = DEFAULTS["compile"] if compile is None else compile
    # compile and graphs ask for fixed shapes
    static = cuda or bool(compile) or bool(graphs) if static is None else static
    graphs = static and cuda if graphs is None else graphs
    attention = attention or DEFAULTS["attention"] or ("sdpa" if cuda else "eager")
    check(static or not (compile or graphs), "compile=True and graphs=True need static=True (fixed shapes)")
    check(attention in ATTENTION, f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if dtype is not None and dtype != model.dtype:
        model = sampling_copy(model, dtype)
    dev, N = model.device, max_new_tokens
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    u = torch.rand(N, batch_rows, generator=gen, device=dev) if temperature else torch.zeros(N, batch_rows, device=dev)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos=torch.tensor(eos, dtype=torch.long, device=dev),
                sdpa=attention == "sdpa")
    P, B = max(map(len, prompts)), min(max_batch or len(prompts), len(prompts))
    d = decoder(model, B, P + N, N, opts, static, graphs, compile)
    d.packed, setup = pack_linears(model) if pack and not compile else {}, d.steps.setup_s
    out = decode(d, prompts, u[:, index.to(dev)], pad_token_id, sync_every, max_batch, on_done or (lambda m: None))
    return Rollout(*out, setup_s=d.steps.setup_s - setup, mode=d.steps.mode)


def main(argv=None):
    p = argparse.ArgumentParser(description="Batched KV-cache sampling: answer one prompt greedily "
                                "(the benchmark: python bench.py rollout).")
    p.add_argument("--bench", action="store_true", help="moved: python bench.py rollout")
    p.add_argument("--model", default=None, help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; "
                   "default: smollm2)")
    p.add_argument("--compile", action="store_true", help="compile the decode step's forward with torch.compile "
                   "(opt-in; graphs.py)")
    p.add_argument("--attention", default="", help="sdpa or eager (default: sdpa on CUDA, eager on CPU)")
    p.add_argument("--prompt", default="What is 12 + 7?", help="a user turn to answer, greedily")
    args, extra = p.parse_known_args(argv)
    check(not args.bench, "rollout.py --bench moved: python bench.py rollout (the same flags)")
    p.parse_args(argv)  # any other unknown flag: argparse's error
    configure(args.compile, args.attention)
    model, tok = load_model(args.model)
    r = generate(model, prompt_ids(tok, [{"messages": [{"role": "user", "content": args.prompt}]}]), max_new_tokens=128,
                 temperature=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    print(tok.decode(r.tokens[0, :r.lengths[0]], skip_special_tokens=True))


if __name__ == "__main__":
    run_main(main)
