"""The settings of a training run, in one place: grpo.py's and bupo.py's, their defaults and their checks.

The defaults are the paper's (Tan et al., arXiv 2512.19673, Sec. 3, as the authors' verl
scripts: Qwen3-4B, 128 prompts x 8 responses of up to 8k tokens, mini-batches of 32
prompts, lr 1e-6, clip 0.2 / 0.2, dual clip 10, token-mean, no KL, s_inter = 30 of 300);
the "cpu" preset scales them to a 2-core CPU and the default 135M model, where the whole
BuPO-vs-GRPO experiment (3 paired seeds) takes minutes (README: the main job). Every field
is a flag (cli.parse_config: --field-name, help from the comment beside it, with the comment
lines below it); check_config refuses a bad setting before any work.
"""
import math
import os
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from transformers import AutoConfig

from cli import check, check_seed
from advantages import ESTIMATORS
from models import CONFIG_DIR
from evaluate import parse_k
from loss import AGGREGATIONS, KL_ESTIMATORS
from policy import PRECISIONS
from rewards import REWARDS


@dataclass
class GRPOConfig:
    """Defaults are the paper's (BuPO Sec. 3); PRESETS["cpu"] fits a 2-core CPU."""
    model: str = None                  # HF checkpoint dir, hub id, short name (smollm2, gemma3-270m) or random:CONFIG;
                                       # None: smollm2
    task: str = "deepmath"             # training problems: arithmetic, deepmath, math500, ... or a data file or hub id
                                       # (problems.py)
    eval_data: str = "aime24,aime25,amc23,math500"  # held-out sets (comma list; "arithmetic" = the held-out half of the
                                                    # task)
    eval_limit: int = 0                # first N problems of each held-out set (0 = all)
    eval_every: int = 10               # evaluate every N steps (and before the first, after the last; 0 = never)
    eval_max_new_tokens: int = 8192    # response limit of the evaluation
    eval_before: bool = True           # evaluate before the first step (experiment.py evaluates the shared start once
                                       # instead)
    eval_samples: int = 16             # Avg@K and Pass@K: K samples per held-out question at temperature 1.0, at the
                                       # start and after the last step (0 = off)
    eval_samples_limit: int = 0        # first N questions of each held-out set for the sampled metric (0 =
                                       # --eval-limit's)
    eval_k: str = ""                   # a K per held-out set for the sampled metric, e.g. aime24=32,amc23=16 (the
                                       # paper's); others: --eval-samples
    reward: str = "math"               # math: grade.py's symbolic grader | verl: the authors' (verl's
                                       # math.compute_score: last \boxed{}, strip_string, exact strings)
    max_prompt_length: int = 0         # keep a longer prompt's last N tokens (verl's truncation='left'; the authors:
                                       # 1024); 0 = no cap
    steps: int = 300                   # training steps
    prompts_per_step: int = 128        # prompts per step (the paper's batch)
    group_size: int = 8                # responses per prompt
    mini_batch_prompts: int = 32       # prompts per PPO update (128 / 32 = 4 updates a step)
    micro_batch: int = 256             # at most this many sequences per forward/backward (gradient accumulation)
    micro_tokens: int = 32768          # and at most this many tokens (sequences x the longest): the memory budget that
                                       # sizes micro-batches
    precision: str = "float32"         # float32 | bfloat16: autocast of the policy's forward and backward (float32
                                       # master weights)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward: memory for long responses,
                                            # ~1/3 more compute
    max_new_tokens: int = 8192         # response limit of the rollouts
    temperature: float = 1.0           # rollout temperature (also divides the training logits, as verl)
    top_p: float = 1.0                 # rollout nucleus
    rollout_dtype: str = ""            # sample with a copy of the weights in this dtype (e.g. bfloat16); "" = the
                                       # model's
    rollout_batch: int = 0             # rows decoded at once (continuous batching), a multiple of group_size (0 = all):
                                       # bounds the KV cache
    compile: bool = False              # compile the rollout's decode step with torch.compile (opt-in; off on torch <
                                       # 2.12, graphs.py)
    attention: str = ""                # the rollout's attention: sdpa | eager ("" = sdpa on CUDA, eager on CPU)
    lr: float = 1e-6                   # AdamW learning rate (constant)
    weight_decay: float = 0.01         # AdamW weight decay (verl's default)
    grad_clip: float = 1.0             # max gradient norm
    clip_low: float = 0.2              # PPO ratio clip below 1
    clip_high: float = 0.2             # PPO ratio clip above 1
    clip_c: float = 10.0               # dual clip for negative advantages
    adv_estimator: str = "grpo"        # verl's algorithm.adv_estimator: grpo | rloo | reinforce_plus_plus | gae (PPO,
                                       # with a critic)
    critic_lr: float = 1e-5            # PPO: the critic's AdamW learning rate (the paper's)
    cliprange_value: float = 0.5       # PPO: the value clip (verl's cliprange_value)
    gamma: float = 1.0                 # PPO and Reinforce++: discount (verl's default)
    lam: float = 1.0                   # PPO: GAE's lambda (verl's default)
    loss_agg: str = "token-mean"       # token-mean (verl's, over the mini-batch) | micro-token-mean (the authors' fork)
                                       # | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    scale_adv: bool = True             # divide by the group std (False: Dr. GRPO)
    kl_coef: float = 0.0               # KL penalty to the frozen initial policy (0 = off, as the paper)
    kl_estimator: str = "k3"           # k1 | k3
    entropy_coef: float = 0.0          # entropy bonus (0 = off, as the paper)
    max_nonfinite: int = 3             # stop after this many non-finite updates in a row
    save_every: int = 0                # also checkpoint every N steps (0: only at the end and on Ctrl-C)
    save_final: bool = True            # checkpoint after the last step (the trained model; lets --resume add --steps)
    seed: int = 0                      # data order, sampling and mini-batch shuffles
    out: str = "runs/grpo"             # output dir: metrics.jsonl, config.json, checkpoint/, curves.png
    resume: bool = False               # continue the run in --out from its checkpoint (saved by any number of ranks)
    overwrite: bool = False            # empty --out first (it holds another run)
    fsdp: bool = False                 # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    bench: bool = False                # moved: python bench.py grpo|bupo (kept so that --bench says so)

    # what a --resume may change: how far and how often, and how the same work is laid out (ranks, memory)
    SAFE_ON_RESUME: ClassVar[tuple] = ("steps", "save_every", "save_final", "eval_every", "bench", "fsdp",
                                       "activation_checkpointing", "micro_batch", "micro_tokens", "rollout_batch",
                                       "compile", "attention")


# The paper's four backbones (Sec. 3, Table 1, 3; the authors' run_code/*.sh): hub id, shipped config (configs/, for
# checks without the hub), k, response length, and the memory plan of one H200 (the 4B and 3B models) or of 8 GPUs
# under torchrun --fsdp (the 8B models: 16 B/param of training state, 131 GB, exceed one card). OctoThinker's k: the
# authors' Llama setting is k = 26 (32 layers); the 28-layer 3B model's best layer in Table 3 is pi_26, k = 25.
PAPER_MODELS = {
    "paper": ("Qwen/Qwen3-4B", "qwen3-4b", 5, 8192, dict(rollout_dtype="bfloat16", rollout_batch=16)),
    "paper-qwen3-8b": ("Qwen/Qwen3-8B", "qwen3-8b", 5, 8192, dict(fsdp=True, rollout_batch=8)),
    "paper-octothinker-3b": ("OctoThinker/OctoThinker-3B-Hybrid-Base", "octothinker-3b", 25, 3072,
                             dict(rollout_dtype="bfloat16", rollout_batch=64)),
    "paper-octothinker-8b": ("OctoThinker/OctoThinker-8B-Hybrid-Base", "octothinker-8b", 26, 3072,
                             dict(fsdp=True, rollout_batch=16)),
}
PAPER_COMMON = dict(  # as the authors ran it: verl's reward, 1024-token prompts cut on the left, the fork's loss,
    reward="verl", max_prompt_length=1024, loss_agg="micro-token-mean", eval_every=30,  # Avg@32 / Avg@16, bf16
    eval_k="aime24=32,aime25=32,amc23=16,math500=16", eval_samples=32, micro_batch=4, activation_checkpointing=True,
    precision="bfloat16")
PRESETS = {
    **{name: dict(PAPER_COMMON, model=hub, max_new_tokens=n, eval_max_new_tokens=n, **plan)
       for name, (hub, _, _, n, plan) in PAPER_MODELS.items()},
    "cpu": dict(task="arithmetic", eval_data="arithmetic", eval_limit=256, eval_every=5, eval_max_new_tokens=48,
                steps=10, prompts_per_step=4, group_size=8, mini_batch_prompts=2, micro_batch=16,
                precision="bfloat16", rollout_dtype="bfloat16", max_new_tokens=48, lr=2e-5, critic_lr=1e-4,
                eval_samples=16, eval_samples_limit=16),
}


def check_config(cfg, config, world=1, memory=None):
    """Every setting, against the model's config where needed, before any work (InputError names the flag).
    memory: the device's bytes (default: the GPU's, else this machine's RAM)."""
    _check_sizes(cfg, world)
    _check_objective(cfg, world)
    _check_sampling(cfg, config)
    _check_evaluation(cfg, config)
    check(not (cfg.resume and cfg.overwrite), "--resume continues the run in --out, --overwrite deletes it: give one")
    check_rollout_memory(cfg, config, world, memory)
    if cfg.adv_estimator == "gae":
        check_ppo_memory(config, memory)


def _check_sizes(cfg, world):
    """Numbers, steps, the seed, and how a step's prompts split into groups, mini-batches, micro-batches and ranks."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        check(not isinstance(v, float) or math.isfinite(v),
              f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
    check(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
    check_seed(cfg.seed)
    for name in ("prompts_per_step", "group_size", "mini_batch_prompts", "micro_batch", "micro_tokens",
                 "max_new_tokens", "eval_max_new_tokens"):
        check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    check(cfg.group_size >= 2, "--group-size must be >= 2: GRPO's baseline is the group mean")
    check(cfg.prompts_per_step % cfg.mini_batch_prompts == 0,
          f"--prompts-per-step {cfg.prompts_per_step} is not a multiple of "
          f"--mini-batch-prompts {cfg.mini_batch_prompts}")
    check(cfg.rollout_batch >= 0 and cfg.rollout_batch % cfg.group_size == 0,
          f"--rollout-batch {cfg.rollout_batch} must be a multiple of --group-size {cfg.group_size} "
          "(whole groups, each prefilled once)")
    check(cfg.mini_batch_prompts % world == 0,
          f"--mini-batch-prompts {cfg.mini_batch_prompts} cannot be split over {world} ranks "
          f"without splitting a group (a group stays on one rank): use a multiple of {world}, or fewer ranks")
    check(cfg.eval_limit >= 0 and cfg.eval_every >= 0 and cfg.save_every >= 0,
          "--eval-limit, --eval-every and --save-every must be >= 0")


def _check_objective(cfg, world):
    """The loss (clip, aggregation, KL, entropy), the optimizer, the advantage estimator and PPO's critic."""
    check(0 <= cfg.clip_low < 1 and cfg.clip_high >= 0,
          f"--clip-low must lie in [0, 1) and --clip-high be >= 0, got {cfg.clip_low}, {cfg.clip_high}")
    check(cfg.clip_c > 1, f"--clip-c must be > 1 (the dual clip bounds -A r at -A c), got {cfg.clip_c}")
    check(cfg.temperature > 0,
          f"--temperature must be > 0 for training (the log-probs divide by it), got {cfg.temperature}")
    check(0 < cfg.top_p <= 1 and cfg.lr > 0 and cfg.grad_clip > 0,
          "--top-p must lie in (0, 1], --lr and --grad-clip be > 0")
    check(cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision}")
    check(cfg.loss_agg in AGGREGATIONS,
          f"--loss-agg must be one of {', '.join(AGGREGATIONS)} (a loss aggregation), got {cfg.loss_agg}")
    check(cfg.kl_coef >= 0 and cfg.entropy_coef >= 0 and cfg.weight_decay >= 0,
          f"--kl-coef, --entropy-coef and --weight-decay must be >= 0, "
          f"got {cfg.kl_coef}, {cfg.entropy_coef}, {cfg.weight_decay}")
    check(cfg.kl_estimator in KL_ESTIMATORS,
          f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {cfg.kl_estimator}")
    check(cfg.max_nonfinite >= 1,
          f"--max-nonfinite must be >= 1 (non-finite updates in a row before stopping), got {cfg.max_nonfinite}")
    check(cfg.adv_estimator in ESTIMATORS,
          f"--adv-estimator must be one of {', '.join(ESTIMATORS)}, got {cfg.adv_estimator}")
    check(cfg.critic_lr > 0 and cfg.cliprange_value > 0, "--critic-lr and --cliprange-value must be > 0")
    check(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1,
          f"--gamma and --lam must lie in [0, 1], got {cfg.gamma}, {cfg.lam}")
    check(cfg.adv_estimator != "gae" or world == 1,
          "PPO (--adv-estimator gae) trains its critic on one process: run it without torchrun")


def _check_sampling(cfg, config):
    """The rollout: its attention, the dtype of its weights' copy, and prompt plus response within the context."""
    check(cfg.attention in ("", "sdpa", "eager"),
          f"--attention must be sdpa or eager (default: sdpa on CUDA, eager on CPU), got '{cfg.attention}'")
    check(cfg.rollout_dtype in ("", "float32", "bfloat16", "float16"),
          f"--rollout-dtype must be float32, bfloat16 or float16, got {cfg.rollout_dtype}")
    check(not (cfg.fsdp and cfg.rollout_dtype),
          "--rollout-dtype copies the model, which --fsdp does not allow: drop one of them")
    check(cfg.max_prompt_length >= 0, f"--max-prompt-length must be >= 0 (0 = no cap), got {cfg.max_prompt_length}")
    check(config.max_position_embeddings >= cfg.max_new_tokens + cfg.max_prompt_length,
          f"--max-new-tokens {cfg.max_new_tokens} (+ --max-prompt-length {cfg.max_prompt_length}) "
          f"exceeds the model's context ({config.max_position_embeddings})")


def _check_evaluation(cfg, config):
    """The held-out evaluation: its response limit, the sampled metric's K, and the grader."""
    check(config.max_position_embeddings >= cfg.eval_max_new_tokens,
          f"--eval-max-new-tokens {cfg.eval_max_new_tokens} exceeds the model's context "
          f"({config.max_position_embeddings})")
    check(cfg.eval_samples >= 0 and cfg.eval_samples_limit >= 0, "--eval-samples and --eval-samples-limit must be >= 0")
    check(cfg.reward in REWARDS, f"--reward must be one of {', '.join(REWARDS)}, got {cfg.reward}")
    ks = parse_k(cfg.eval_k) if cfg.eval_k else {}
    check(isinstance(ks, dict) and set(ks) <= set(cfg.eval_data.split(",")),
          f"--eval-k must name held-out sets of --eval-data ({cfg.eval_data}) as set=K, got '{cfg.eval_k}'")


def kv_cache_bytes(config, rows, slots, itemsize):
    """Bytes of rollout.py's KV cache: keys and values of `slots` positions of each row, in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * rows * slots * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def check_rollout_memory(cfg, config, world=1, memory=None):
    """Refuse a rollout whose KV cache (rows x (prompt + max new tokens) slots, the prompt counted as 0: a lower
    bound) exceeds half the device's memory (memory: bytes; default the GPU's, else this machine's RAM), naming the
    --rollout-batch that fits. The paper's 1024 rows x 8k slots of Qwen3-4B would need 1.2 TB."""
    rows = cfg.rollout_batch or cfg.prompts_per_step // world * cfg.group_size
    itemsize = 2 if cfg.rollout_dtype in ("bfloat16", "float16") or torch.cuda.is_available() else 4
    need, per_row = (kv_cache_bytes(config, rows, cfg.max_new_tokens, itemsize),
                     kv_cache_bytes(config, 1, cfg.max_new_tokens, itemsize))
    memory = device_memory() if memory is None else memory
    fit = int(memory / 2 // per_row) // cfg.group_size * cfg.group_size
    check(need <= memory / 2,
          f"the rollout's KV cache needs at least {need / 1e9:.1f} GB ({rows} rows x {cfg.max_new_tokens} slots) "
          f"but half this device's memory is {memory / 2e9:.1f} GB: pass --rollout-batch {fit}"
          if fit >= cfg.group_size
          else f"the rollout's KV cache of one group ({cfg.group_size} rows x {cfg.max_new_tokens} slots) "
               f"exceeds half this device's memory ({memory / 2e9:.1f} GB): lower --max-new-tokens or --group-size")


@dataclass
class BuPOConfig(GRPOConfig):
    layer: int | None = None           # internal layer k (0-indexed; the paper's k+1), or auto: entropy.py's EIC layer
    inter_steps: int = 30              # s_inter: steps that optimize pi_k before plain GRPO
    seeds: str = "1"                   # N: seeds seed..seed+N-1; or a comma list of seeds (e.g. 3,7); BuPO and GRPO
                                       # share each
    methods: str = "bupo,grpo"         # which runs the experiment trains (bupo alone saves half the compute at the
                                       # paper's scale)
    sweep: str = ""                    # an ablation of BuPO: layer=4,14,24 or inter_steps=2,5,10 (each value on every
                                       # seed)
    profile_samples: int = 8           # responses used for the internal entropy profiles and layer=auto
    profile_every: int = 10            # log the internal entropy profile every N steps and after the last (0 = never)
    probe_every: int = 0               # Fig. 5: probe layer k's feature refinement every N steps and after the last (0
                                       # = never)
    probe_samples: int = 4             # the fixed probe set: responses of the start model to the first N held-out
                                       # questions
    keep_checkpoints: bool = False     # keep each finished run's final checkpoint (1.6 GB for the default model)
    out: str = "runs/bupo"             # output dir: seed*/<run>/, results.md, results.json and the figures

    # an experiment's finished runs stop at --steps, their checkpoints deleted: steps may not change on resume
    SAFE_ON_RESUME: ClassVar[tuple] = tuple(f for f in GRPOConfig.SAFE_ON_RESUME if f != "steps") + (
        "seeds", "methods", "sweep", "keep_checkpoints", "profile_every", "probe_every", "probe_samples")


def resume_safe(cfg):
    """The settings a --resume of this run may change. Under the authors' loss (micro-token-mean) each micro-batch's
    mean is weighted by its rows, so the micro-batch split is part of the objective and may not change."""
    fixed = ("micro_batch", "micro_tokens") if cfg.loss_agg == "micro-token-mean" else ()
    return tuple(f for f in cfg.SAFE_ON_RESUME if f not in fixed)


BUPO_PRESETS = {**{name: dict(PRESETS[name], layer=k, inter_steps=30, out="runs/bupo")
                   for name, (_, _, k, _, _) in PAPER_MODELS.items()},
                "cpu": {**PRESETS["cpu"], "layer": 4, "inter_steps": 3, "seeds": "3", "profile_every": 0,
                        "out": "runs/bupo"}}


def device_memory():
    """Bytes of the GPU's memory, else of this machine's RAM."""
    return (torch.cuda.mem_get_info()[1] if torch.cuda.is_available()
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def param_count(config):
    """Parameters of a Llama / Qwen2 / Qwen3 decoder from its config: embeddings, layers (attention with GQA, the
    gated MLP, norms; Qwen3's q/k norms), the final norm, and an lm_head of its own unless tied."""
    D, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or D // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    bias = (q + 2 * kv) if getattr(config, "attention_bias", False) or config.model_type == "qwen2" else 0
    layer = D * q + 2 * D * kv + q * D + bias + 3 * D * I + 2 * D + (2 * hd if config.model_type == "qwen3" else 0)
    return V * D * (1 if config.tie_word_embeddings else 2) + L * layer + D


def memory_plan(cfg, config, world=1):
    """GB a GPU holds in a run of cfg (README, "What fits where"): the training state (fp32 weights, gradients, AdamW m
    and v: 16 B/param, sharded by --fsdp over `world` ranks), the rollout's weights (a bf16 copy, or under --fsdp the
    gathered fp32 ones) and KV cache (prompt + response slots), the update's activations (with checkpointing: each
    layer's fp32 input, one layer recomputed, one chunk of logits), and the peak (on CUDA the rollout's stay)."""
    P, D, I, L = param_count(config), config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or D // config.num_attention_heads
    H, KV, seq = (config.num_attention_heads * hd, config.num_key_value_heads * hd,
                  cfg.max_prompt_length + cfg.max_new_tokens)
    bf16 = cfg.rollout_dtype in ("bfloat16", "float16")
    rows = cfg.rollout_batch or cfg.prompts_per_step // world * cfg.group_size
    # bytes a token: normed inputs, q/k/v and norms, GQA-expanded k/v, MLP
    one_layer = 4 * (2 * D + 4 * H + 2 * KV + 4 * I)
    per_token = (4 * L * D + one_layer) if cfg.activation_checkpointing else L * one_layer
    plan = {"training state": 16 * P / (world if cfg.fsdp else 1),
            "rollout weights": (2 if bf16 else 4) * P if (bf16 or cfg.fsdp) else 0,
            "KV cache": kv_cache_bytes(config, rows, seq, 2 if bf16 else 4),
            "activations": cfg.micro_batch * seq * per_token + 2 * (1 << 30)}
    return {k: v / 1e9 for k, v in plan.items()} | {"peak": sum(plan.values()) / 1e9, "params (B)": P / 1e9}


def check_ppo_memory(config, memory=None):
    """Refuse PPO where the policy's and the critic's training states (16 B/param each: the critic is a float32 copy of
    the decoder with its own AdamW, critic.py, on one process) exceed half the device's memory, with the arithmetic."""
    memory, P = device_memory() if memory is None else memory, param_count(config)
    check(32 * P <= memory / 2,
          f"PPO (--adv-estimator gae / --methods ppo) does not fit: the policy's training state (16 B/param x "
          f"{P / 1e9:.2f} B = {16 * P / 1e9:.1f} GB) plus its critic's (a float32 copy of the decoder with AdamW, "
          f"the same {16 * P / 1e9:.1f} GB) need {32 * P / 1e9:.1f} GB before any activation or rollout, on one "
          "process (the critic is not sharded under torchrun here), against half this device's "
          f"{memory / 1e9:.0f} GB; leave ppo out at this scale (verl runs it with an FSDP-sharded critic), "
          "or use a smaller model")


def preset_help(presets):
    """One line per paper preset for --help: model, k (BuPO), response length, and the memory plan on its GPUs."""
    lines = []
    for name, (hub, shipped, k, n, plan) in PAPER_MODELS.items():
        if name in presets:
            cfg = GRPOConfig(**PRESETS[name])
            config = AutoConfig.from_pretrained(os.path.join(CONFIG_DIR, shipped + ".json"))
            world = 8 if cfg.fsdp else 1
            gpus = "torchrun --nproc_per_node=8 (--fsdp)" if cfg.fsdp else "one H200"
            lines.append(f"--preset {name}: {hub}, {n}-token responses (BuPO: k={k}, s_inter=30); on {gpus}: "
                         f"{memory_plan(cfg, config, world)['peak']:.0f} GB a GPU at peak.")
    return " ".join(lines)
