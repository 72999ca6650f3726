"""The rollout engine against Hugging Face `generate`: speed, the memory-bandwidth bound, and agreement.

rollout.py samples every training response (arXiv 2512.19673, Sec. 3: groups of responses
per prompt); this measures it against its peer, HF `generate` (dynamic cache, and a
static cache compiled by transformers), at fixed length, with finished rows refilled,
on the GRPO workload, greedy tokens against HF's, and bf16 rollouts against the float32
policy. Run through bench.py:

    python bench.py rollout                                   # ours vs HF generate, default model, CPU
    python bench.py rollout --device cuda --random-weights qwen3-0.6b   # GPU: the shape of Qwen3-0.6B, bf16
"""
import argparse
import copy
import math

import torch
import torch.nn.functional as F

from cli import check
from decode import release
from graphs import FELL_BACK, why
from hardware import bandwidth, timed
from models import EMBEDDED, RANDOM, load_model
from policy import output_policy, pad_rows
from problems import load_problems, prompt_ids
from rollout import configure, generate


def rollout_args(argv=None):
    """The flags of `python bench.py rollout`, checked."""
    p = argparse.ArgumentParser(prog="bench.py rollout",
                                description="Batched KV-cache sampling (rollout.py) against HF generate.")
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint dir, hub id or short name ({', '.join(EMBEDDED)}; default: smollm2)")
    p.add_argument("--random-weights", default="", metavar="CONFIG",
                   help="bench a shipped config (configs/CONFIG.json, e.g. qwen3-0.6b) with random weights")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="", help="bfloat16 or float32 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes of the fixed-length case (default: CPU 1 8 64, CUDA 1 64 256)")
    p.add_argument("--new-tokens", type=int, default=0,
                   help="new tokens in the fixed-length case (default: CPU 128, CUDA 256)")
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="memory bandwidth in GB/s for the bound (default: the card's by name, else measured)")
    p.add_argument("--hf-static-tokens", type=int, default=32,
                   help="new tokens of the timed HF generate with a static cache (0: skip it)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step's forward with torch.compile (opt-in; graphs.py)")
    p.add_argument("--attention", default="", help="sdpa or eager (default: sdpa on CUDA, eager on CPU)")
    args = p.parse_args(argv)
    configure(args.compile, args.attention)
    check(args.device in ("", "cpu") or args.device.startswith("cuda") and torch.cuda.is_available(),
          f"--device must be cpu, or cuda where torch sees a CUDA device (it sees {torch.cuda.device_count()}); "
          f"got '{args.device}'")
    check(args.dtype in ("", "bfloat16", "float32"), f"--dtype must be bfloat16 or float32, got '{args.dtype}'")
    check(all(b >= 1 for b in args.batches or [1]) and args.new_tokens >= 0 and args.hf_static_tokens >= 0,
          "--batches must be >= 1, --new-tokens and --hf-static-tokens >= 0")
    check(math.isfinite(args.bandwidth) and args.bandwidth >= 0,
          f"--bandwidth must be a finite GB/s >= 0 (0 = measure), got {args.bandwidth}")
    return args


def step_bytes(model, batch, filled):
    """Bytes a decode step must read: every weight once and `filled` cache slots of each row."""
    c, a = model.config, model.model.layers[0].self_attn
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied lm_head is counted once
    return (weights
            + batch * filled * 2 * c.num_hidden_layers * c.num_key_value_heads * a.head_dim * model.dtype.itemsize)


def bench_fixed(model, batch, new_tokens, prompt_len=32, static_tokens=0):
    """Seconds a step of HF generate takes with its dynamic cache and (static_tokens > 0) with a static cache (compiled
    by transformers on CUDA; its first call, which compiles, not timed), and the Rollout, seconds and setup seconds
    (compile and capture, timed apart) of ours, for fixed-length sampling (EOS ignored), same prompts and settings."""
    prompts = torch.randint(100, 1000, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(0))
    ids = prompts.to(model.device)
    hf = lambda n, **kw: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
    _, t_hf = timed(lambda: hf(new_tokens), model.device)
    t_static = float("nan")
    try:  # a peer's failure is reported, not ours: the row goes on without it
        if static_tokens:
            hf(static_tokens, cache_implementation="static")
            t_static = timed(lambda: hf(static_tokens, cache_implementation="static"), model.device)[1] / static_tokens
    except Exception as e:
        print(f"HF generate with a static cache failed at batch {batch}: {why(e)}", flush=True)
    r, t_us, setup = replayed(lambda: generate(model, prompts.tolist(), max_new_tokens=new_tokens, seed=0),
                              model.device)
    return t_hf / new_tokens, t_static, r, t_us / new_tokens, setup


def replayed(fn, device):
    """(fn()'s Rollout, its seconds, the seconds its first call spent compiling and capturing): where the first call
    compiled or captured (once per shape), the time of a second call, which replays."""
    r, t = timed(fn, device)
    if not r.setup_s:
        return r, t, 0.0
    r2, t2 = timed(fn, device)
    return r2, t2, r.setup_s


def tokens_to_eos(new, eos):
    """Tokens HF generate sampled in `new` (B, N), each row counted up to its first EOS (included)."""
    ended = torch.isin(new, torch.tensor(eos, device=new.device))
    return torch.where(ended.any(1), ended.float().argmax(1) + 1, ended.shape[1]).sum().item()


def bench_grpo(model, tok, n_prompts=16, group=8, new_tokens=256):
    """The GRPO workload: math prompts x group samples, T=1, stop at EOS; tok/s counting tokens up to each EOS."""
    prompts = [p for p in prompt_ids(tok, load_problems("math500")[:n_prompts]) for _ in range(group)]
    P = max(map(len, prompts))
    # (B, P) left-padded
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts], device=model.device)
    att = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out, t_hf = timed(lambda: model.generate(ids, attention_mask=att, do_sample=True, top_k=0,
                                              max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id), model.device)
    n_hf = tokens_to_eos(out[:, ids.shape[1]:], [tok.eos_token_id])
    r, t_us, _ = replayed(lambda: generate(model, prompts, max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, seed=0), model.device)
    return n_hf / t_hf, r.lengths.sum().item() / t_us


def bench_refill(model, rows, new_tokens, prompt_len=32):
    """tok/s of HF generate and of ours on 4 x rows prompts, rows at a time, each row ending at a random step (every
    97th id is an EOS): HF runs chunk after chunk, each until its longest row ends; ours refills finished rows."""
    prompts = torch.randint(100, 1000, (4 * rows, prompt_len),
                            generator=torch.Generator().manual_seed(0)).to(model.device)
    eos = list(range(0, model.config.vocab_size, 97))
    kw = dict(do_sample=True, top_k=0, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0)
    outs, t_hf = timed(lambda: [model.generate(c, attention_mask=torch.ones_like(c), **kw)
                                for c in prompts.split(rows)], model.device)
    # a chunk that ended early: (rows, N)
    new = [F.pad(o[:, prompt_len:], (0, new_tokens + prompt_len - o.shape[1]), value=eos[0]) for o in outs]
    n_hf = tokens_to_eos(torch.cat(new), eos)
    r, t_us, _ = replayed(lambda: generate(model, prompts.tolist(), max_new_tokens=new_tokens, eos_token_id=eos, seed=0,
                                           max_batch=rows), model.device)
    return n_hf / t_hf, r.lengths.sum().item() / t_us


def greedy_agreement(model, n_prompts=4, new_tokens=32):
    """Prompts on which our greedy tokens equal HF generate's, one prompt at a time, in float32."""
    m = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    g, same = torch.Generator().manual_seed(1), 0
    for _ in range(n_prompts):
        p = torch.randint(100, 1000, (1, 16), generator=g).to(m.device)
        hf = m.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
        same += (generate(m, p.tolist(), max_new_tokens=new_tokens, temperature=0).tokens[0].tolist()
                 == hf[0, 16:].tolist())
    if m is not model:
        release()  # the kept Decoder holds the float32 copy
    return same


def bf16_drift(model, tok, n=8):
    """Mean and max |log-prob| difference of bf16 rollouts from the float32 policy's, on the tokens sampled."""
    prompts = prompt_ids(tok, load_problems("math500")[:n])
    r = generate(model, prompts, max_new_tokens=64, seed=0, dtype=torch.bfloat16, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    responses = [r.tokens[i, :r.lengths[i]].tolist() for i in range(n)]
    ids, att, resp = pad_rows(prompts, responses, tok.pad_token_id, model.device)
    lp = output_policy(model, ids, att, mask=resp)[0][resp]  # teacher forcing, float32
    d = (lp - torch.cat([r.logprobs[i, :r.lengths[i]] for i in range(n)])).abs()
    return d.mean().item(), d.max().item(), len(d)


# substrings of profiler event names (aten ops, CUDA kernels) -> SDPA's kernel
SDPA_KERNELS = [("cudnn", "cuDNN"), ("flash", "flash"), ("fmha", "memory-efficient"),
                ("efficient_attention", "memory-efficient"), ("attention_math", "math")]


def attention_kernels(names):
    """The SDPA kernels named among profiler event names: {kind: the longest such name} (kind: flash, cuDNN, ...)."""
    found = {}
    for name in names:
        low = name.lower()
        kind = next((k for pat, k in SDPA_KERNELS
                     if pat in low and ("cudnn" != pat or "sdpa" in low or "attention" in low)), None)
        if kind and len(name) > len(found.get(kind, "")):
            found[kind] = name
    return found


def attention_ran(model, batch, new_tokens=4, prompt_len=32):
    """The attention kernel a generate call ran, from torch.profiler's event names (CUDA kernels and aten ops), on a
    few eager steps of the bench's shapes (a graph replay hides its kernels from the profiler)."""
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    acts = ([torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if model.device.type == "cuda" else []))
    with torch.profiler.profile(activities=acts) as prof:
        generate(model, prompts, max_new_tokens=new_tokens, seed=0, graphs=False, compile=False)
    found = attention_kernels({e.name for e in prof.events()})
    if not found:
        return "written out (matmul + softmax)"
    return "; ".join(f"{k}: {n[:60]}" for k, n in found.items())


def bench_rollout(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_model(RANDOM + args.random_weights if args.random_weights else args.model,
                            dtype=dtype, device=device)
    torch.set_grad_enabled(False)
    batches = args.batches or ([1, 64, 256] if device.type == "cuda" else [1, 8, 64])
    N = args.new_tokens or (256 if device.type == "cuda" else 128)
    bw, source = bandwidth(device, args.bandwidth)
    print(f"{device} ("
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{model.config.model_type} {model.config.num_hidden_layers} layers, {model.dtype}, "
          f"torch {torch.__version__}; memory bandwidth {bw / 1e9:.0f} GB/s ({source}); "
          f"attention {args.attention or 'default'}, compile {args.compile}")
    print(f"greedy, float32, 32 tokens: ours equals HF generate on {greedy_agreement(model)} of 4 prompts", flush=True)
    bench_fixed(model, 2, 8)  # warm-up: lazy initialization of both
    print(f"fixed length, {N} new tokens; HF static: its cache compiled by transformers, {args.hf_static_tokens} "
          "tokens timed after a first call; setup s: our compiles and captures, apart from the timed replays")
    print(f"{'batch':<7}{'mode':<16}{'HF ms':>8}{'HF st ms':>10}{'ours ms':>9}{'tok/s':>10}{'x HF':>7}{'x HF st':>8}"
          f"{'of bw':>7}{'setup s':>9}  attention")
    for batch in batches:
        t_hf, t_st, r, t_us, setup = bench_fixed(model, batch, N, static_tokens=args.hf_static_tokens)
        # seconds a step needs at full bandwidth, the cache half full on average
        bound = step_bytes(model, batch, 32 + N // 2) / bw
        print(f"{batch:<7}{r.mode:<16}{1e3 * t_hf:>8.2f}{1e3 * t_st:>10.2f}{1e3 * t_us:>9.2f}{batch / t_us:>10.1f}"
              f"{t_hf / t_us:>6.2f}x{t_st / t_us:>7.2f}x{bound / t_us:>7.1%}{setup:>9.1f}  "
              f"{attention_ran(model, batch)}", flush=True)
    for path, reason in FELL_BACK.items():
        print(f"fell back: {path} off ({reason})")
    rows = batches[-1] // 4 or 1
    hf, us = bench_refill(model, rows, N)
    print(f"{f'{4 * rows} prompts, {rows} rows':<24}{hf:>10.1f}{us:>12.1f}{us / hf:>7.2f}x  "
          "(tok/s HF, ours; rows end at random steps; ours refills them)", flush=True)
    if tok is not None and not args.random_weights:
        hf, us = bench_grpo(model, tok)
        print(f"{'GRPO workload 16x8 <=256':<24}{hf:>10.1f}{us:>12.1f}{us / hf:>7.2f}x", flush=True)
        if device.type == "cpu":
            mean, mx, n = bf16_drift(model, tok)
            print(f"bf16 rollout log-probs vs the float32 policy on {n} tokens: mean |diff| {mean:.4f}, max {mx:.4f}")
