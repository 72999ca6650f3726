"""Training benchmarks: one GRPO step's parts against the matmul peak, and BuPO's phase-1 update against a full one.

GRPO (arXiv 2512.19673, Sec. 3): the step as configured, then with each of its speed-ups
switched off in turn (BENCH_OFF), each in a fresh process, so that the switches (some of
them policy.py's module constants, LOGITS_BUDGET and SHARE_PROMPTS) stay in that process;
and the aten ops one update dispatches on CUDA's path. BuPO (Sec. 3): one update of
pi_k against one of the output policy and a plain HF forward+backward. Run through bench.py:

    python bench.py grpo                 # one step's parts, each change switched off in turn
    python bench.py bupo                 # a phase-1 update against a full one, all positions scored
"""
import copy
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import distributed
import policy as policy_lib
from advantages import group_advantages
from config import GRPOConfig
from hardware import clock, matmul_peak
from loss import policy_loss
from models import load_model, model_config
from policy import Batch, check_layer, compute_precision, decoder_tokens, layer_policy, micro_slices, output_policy
from problems import task_problems
from rollout import configure as configure_sampling
from update import policy_logprobs, ppo_update, rollout_step


# ----------------------------------------------------------------------------- GRPO's step

BENCH_OFF = {  # each change to a training step, as `bench.py grpo` switches it off: the code before it
    "bf16 autocast": {"precision": "float32"},
    # 85 rows at V=49k, each chunk checkpointed: the lm_head ran twice
    "logits by memory budget": {"logits_budget": 1 << 24},
    "on-policy first mini-batch": {"on_policy_first": False},
    "denormals flushed": {"flush": False},
    "prompts shared by a group": {"share_prompts": False},
    "fused AdamW": {"fused_adam": False},
    "bf16 rollout": {"rollout_dtype": "float32"},
}


# .ci/gpu-check's step
GPU_CHECK = dict(prompts_per_step=16, group_size=8, mini_batch_prompts=8, max_new_tokens=256, precision="bfloat16")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched: on a GPU each is a kernel launch (or a view) that the CPU issues."""
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def update_ops(name="random:qwen3-0.6b", prompt_len=35, vocab=1024):
    """(aten ops dispatched, FLOPs) of one update (ppo_update over a step's mini-batches) at .ci/gpu-check's settings on
    CUDA's path (no prompt sharing), counted here on the CPU: the shape's layers at a tiny width (the op count does not
    depend on widths), its vocabulary cut to `vocab` and the logits budget alike (the same chunks); FLOPs at full width.
    Meant for a fresh process (it sets policy.py's globals)."""
    config, cfg = model_config(name), GRPOConfig(**GPU_CHECK)
    tiny = copy.deepcopy(config)
    tiny.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     vocab_size=vocab))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32).train()
    policy_lib.SHARE_PROMPTS, policy_lib.LOGITS_BUDGET = (), policy_lib.LOGITS_BUDGET * vocab // config.vocab_size
    N, T = cfg.prompts_per_step * cfg.group_size, prompt_len + cfg.max_new_tokens
    ids = torch.randint(3, vocab, (N, T))  # (N, T) every response as long as allowed
    resp = (torch.arange(T) >= prompt_len).expand(N, T)  # (N, T)
    batch = Batch(ids, torch.ones_like(ids), resp, group_advantages(torch.rand(N), cfg.group_size),
                  ([T] * N, [T - prompt_len] * N))
    runner = distributed.Wrapped(model)
    old = torch.zeros(N, T)
    with OpCounter() as ops:
        ppo_update(runner, torch.optim.AdamW(runner.parameters(), fused=True), output_policy, batch, old, None, cfg)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    return ops.n, 3 * pass_flops(full, batch, cfg, range(N))


def pass_flops(model, batch, cfg, rows):
    """Forward FLOPs over the micro-batches of `rows`: 2 per decoder weight and token run (padding too), 2 per lm_head
    weight and scored token (attention scores, < 3% here, are left out). A backward costs twice a forward."""
    lm = model.lm_head.weight.numel()
    dec = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return sum(2 * dec * decoder_tokens(ids, att, resp) + 2 * lm * int(resp[:, 1:].sum())
               for _, ids, att, resp, _ in micro_slices(batch, rows, cfg.micro_batch, cfg.micro_tokens))


def bench_step(cfg, off, repeats=2):
    """One step's parts, in seconds, with the changes in `off` switched off; meant for a fresh process (see bench)."""
    torch.set_flush_denormal(off.get("flush", True))  # before any parallel op: every thread of the pool inherits it
    policy_lib.LOGITS_BUDGET = off.get("logits_budget", policy_lib.LOGITS_BUDGET)
    policy_lib.SHARE_PROMPTS = ("cpu",) if off.get("share_prompts", True) else ()
    cfg = GRPOConfig(**{**cfg, **{k: off[k] for k in ("precision", "rollout_dtype") if k in off}})
    configure_sampling(cfg.compile, cfg.attention)
    model, tok = load_model(cfg.model, dtype=torch.float32)
    t = clock(model.device)
    batch, _ = rollout_step(model, tok, task_problems(cfg.task, cfg.prompts_per_step, cfg.seed, "train"), cfg, 0)
    r = {"rollout": clock(model.device) - t, "old": [], "update": [], "tokens": int(batch.attention_mask.sum())}
    N, first = (batch.input_ids.shape[0],
                cfg.mini_batch_prompts * cfg.group_size if off.get("on_policy_first", True) else 0)
    for _ in range(repeats + 1):  # the first is a warm-up
        runner = distributed.Wrapped(copy.deepcopy(model).train())
        opt = torch.optim.AdamW(runner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=off.get("fused_adam", True))
        t = clock(model.device)
        old, _ = policy_logprobs(output_policy, runner, batch, cfg, rows=range(first, N))
        t1 = clock(model.device)
        ppo_update(runner, opt, output_policy, batch, old, None, cfg, on_policy_first=first > 0)
        r["old"].append(t1 - t)
        r["update"].append(clock(model.device) - t1)
    r["old"], r["update"] = min(r["old"][1:]), min(r["update"][1:])
    r["flops"] = pass_flops(model, batch, cfg, range(first, N)) + 3 * pass_flops(model, batch, cfg, range(N))
    r["peak"] = matmul_peak(torch.bfloat16 if cfg.precision == "bfloat16" else torch.float32, model.device)
    return r


def bench_grpo_step(cfg):
    """Time one step's parts as configured, then with each change switched off, and all of them: each in a fresh
    process."""
    configs = {"as configured": {}, **{f"without {k}": v for k, v in BENCH_OFF.items()},
               "without all (the code before)": {k: v for c in BENCH_OFF.values() for k, v in c.items()}}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        ops, flops = pool.submit(update_ops).result()
    print(f"one update at .ci/gpu-check's settings ({GPU_CHECK['prompts_per_step']} prompts x "
          f"{GPU_CHECK['group_size']}, {GPU_CHECK['max_new_tokens']} new tokens, Qwen3-0.6B's 28 layers), "
          f"CUDA's path: {ops:,} aten ops dispatched (counted on the CPU at a tiny width) "
          f"for {flops / 1e12:.0f} TFLOP at full width")
    print(f"one step: {cfg.prompts_per_step} prompts x {cfg.group_size}, <= {cfg.max_new_tokens} new tokens, "
          f"mini-batches of {cfg.mini_batch_prompts} prompts, micro-batches of <= {cfg.micro_batch} rows and "
          f"{cfg.micro_tokens} tokens, {cfg.precision}; {torch.get_num_threads()} threads")
    print(f"{'':<36}{'rollout s':>10}{'old lp s':>10}{'update s':>10}{'step s':>8}{'tok/s':>8}{'GFLOP/s':>9}{'peak':>7}"
          f"{'of peak':>8}")
    step = {}
    for name, off in configs.items():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            r = pool.submit(bench_step, asdict(cfg), off).result()
        train_s = r["old"] + r["update"]
        step[name] = r["rollout"] + train_s
        print(f"{name:<36}{r['rollout']:>10.2f}{r['old']:>10.2f}{r['update']:>10.2f}{step[name]:>8.2f}"
              f"{2 * r['tokens'] / train_s:>8.0f}{r['flops'] / train_s / 1e9:>9.1f}{r['peak'] / 1e9:>7.0f}"
              f"{r['flops'] / train_s / r['peak']:>8.1%}", flush=True)
    print(f"step time, the code before / now: {step['without all (the code before)'] / step['as configured']:.2f}x   "
          "(tok/s: tokens through the old-log-prob pass and the update; peak: a 2048^3 matmul in the step's dtype)")


# ----------------------------------------------------------------------------- BuPO's phase 1

def bench_bupo_update(cfg, repeats=2):
    """Seconds of one phase-1 update (pi_k) against a full one and a plain HF forward+backward, all positions scored."""
    model, tok = load_model(cfg.model, dtype=torch.float32)
    k, L = cfg.layer if cfg.layer is not None else 4, model.config.num_hidden_layers
    check_layer(model.config, k)
    problems = task_problems("math500", 8, 0, "test")
    batch, _ = rollout_step(model, tok, problems, replace(cfg, group_size=1, max_new_tokens=256), 0)
    batch.response_mask = batch.attention_mask.bool()  # every position scored
    ids, att = batch.input_ids, batch.attention_mask

    def update(policy):
        lp, _ = policy(model, ids, att, 1.0, batch.response_mask)
        policy_loss(lp, lp.detach(), batch.advantages, batch.response_mask)[0].backward()

    def plain():
        logits = model(ids, attention_mask=att).logits[:, :-1].float()
        logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).sum().backward()
    times = {}
    for name, fn in (("phase 1 (pi_k)", lambda: update(layer_policy(k))),
                     ("full (output policy)", lambda: update(output_policy)),
                     ("plain HF forward+backward", plain)):
        ts = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t = clock(model.device)
            with compute_precision(cfg.precision, model.device):
                fn()
            model.zero_grad(set_to_none=True)
            ts.append(clock(model.device) - t)
        times[name] = min(ts[1:])
    D, V = model.config.hidden_size, model.config.vocab_size
    per_layer = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    bound = ((k + 1) * per_layer + D * V) / (L * per_layer + D * V)
    print(f"batch: {ids.shape[0]} sequences x {ids.shape[1]} tokens, every position scored; k={k}, L={L}, "
          f"{cfg.precision}")
    for name, t in times.items():
        print(f"{name:>28}: {t:.2f} s forward+backward")
    print(f"phase 1 / plain = {times['phase 1 (pi_k)'] / times['plain HF forward+backward']:.3f}, phase 1 / full = "
          f"{times['phase 1 (pi_k)'] / times['full (output policy)']:.3f}  "
          f"(FLOP bound ((k+1) layers + lm_head) / (L layers + lm_head) = {bound:.3f})")
    return times
