"""The paper's presets (issue 30.5, 30.6): each validated against its model's shipped config without a GPU, their
memory plans, PPO refused with the arithmetic where it cannot fit, and the analyses at Qwen3-4B's real width."""
import os
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import bupo
from cli import InputError
from config import (BUPO_PRESETS, PAPER_MODELS, BuPOConfig, check_config, check_ppo_memory, memory_plan, param_count)
from models import CONFIG_DIR
from policy import check_layer

H200, H100 = 141e9, 80e9
# the public model cards' sizes: Qwen3-4B 4.0 B, Qwen3-8B 8.2 B, Llama-3.2-3B 3.21 B, Llama-3.1-8B 8.03 B
# (OctoThinker's bases)
SIZES = {"qwen3-0.6b": 0.596e9, "qwen3-4b": 4.022e9, "qwen3-8b": 8.191e9, "octothinker-3b": 3.213e9,
         "octothinker-8b": 8.030e9}


def shipped(name):
    return AutoConfig.from_pretrained(os.path.join(CONFIG_DIR, name + ".json"))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_shipped_configs_have_the_model_cards_sizes(name):
    """Each shipped config built on the meta device (no memory) has its model's parameter count, and param_count's
    arithmetic (the memory plans') is Hugging Face's count exactly."""
    config = shipped(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count(config) and n == pytest.approx(SIZES[name], rel=1e-3)


@pytest.mark.parametrize("preset", sorted(PAPER_MODELS))
def test_each_paper_preset_fits_its_model(preset):
    """The preset against its model's config: k an internal layer, prompt + response within the context, every setting
    accepted (check_config, with its ranks and an H200's memory), and its memory plan under an H200 (141 GB) a GPU;
    the 8B presets shard over 8 GPUs because one would not hold them."""
    hub, name, k, n, _ = PAPER_MODELS[preset]
    cfg, config = BuPOConfig(**BUPO_PRESETS[preset]), shipped(name)
    world = 8 if cfg.fsdp else 1
    assert (cfg.model == hub and cfg.layer == k and cfg.max_new_tokens == n and cfg.inter_steps == 30
            and cfg.steps == 300)
    assert (cfg.prompts_per_step, cfg.mini_batch_prompts, cfg.group_size, cfg.lr) == (128, 32, 8, 1e-6)
    assert (cfg.reward, cfg.max_prompt_length, cfg.loss_agg) == ("verl", 1024, "micro-token-mean")
    check_layer(config, k)
    assert k < config.num_hidden_layers - 1 and cfg.max_prompt_length + n <= config.max_position_embeddings
    check_config(cfg, config, world, memory=H200)
    assert memory_plan(cfg, config, world)["peak"] < H200 / 1e9
    one = memory_plan(replace(cfg, fsdp=False, rollout_dtype="bfloat16"), config, 1)["peak"]  # on one GPU
    assert (one > H200 / 1e9) == cfg.fsdp  # the 8B models: 16 B/param of training state alone is 128-131 GB


def test_memory_plan_of_qwen3_4b_is_the_readmes():
    """README, "What fits where": 64.3 GB of training state, 8.0 GB of bf16 weights, ~25 GB of activations at
    micro-batch 4 with checkpointing; the KV cache of 16 rows x (1024 + 8192) slots, 2 x 36 x 8 x 128 bf16 values
    a slot."""
    plan = memory_plan(BuPOConfig(**BUPO_PRESETS["paper"]), shipped("qwen3-4b"))
    assert (plan["training state"] == pytest.approx(64.36, abs=0.01)
            and plan["rollout weights"] == pytest.approx(8.04, abs=0.01))
    assert plan["KV cache"] == pytest.approx(16 * 9216 * 2 * 36 * 8 * 128 * 2 / 1e9) and 20 < plan["activations"] < 30


def test_ppo_is_refused_at_the_papers_scale_with_the_arithmetic():
    """Issue 30.6: the critic is a float32 copy with AdamW on one process: 2 x 64.4 GB for Qwen3-4B, over half
    an H200."""
    with pytest.raises(InputError, match=r"16 B/param x 4.02 B = 64.4 GB.*need 128.7 GB.*141 GB"):
        check_ppo_memory(shipped("qwen3-4b"), H200)
    check_ppo_memory(shipped("qwen3-0.6b"), H200)  # 19 GB: fits
    with pytest.raises(InputError, match="PPO.*does not fit"):
        check_config(BuPOConfig(**{**BUPO_PRESETS["paper"], "adv_estimator": "gae"}), shipped("qwen3-4b"), 1,
                     memory=H200)


def test_help_prints_each_paper_preset(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at hyphens ("Hybrid-" / "Base") otherwise
    with pytest.raises(SystemExit):
        bupo.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for preset, (hub, _, k, n, _) in PAPER_MODELS.items():
        assert f"--preset {preset}: {hub}, {n}-token responses (BuPO: k={k}, s_inter=30)" in out


def test_analyses_at_qwen3_4b_width():
    """The entropy analysis and BuPO's pi_k at Qwen3-4B's real width, heads and 152k vocabulary, on random bf16 weights
    of a 2-layer copy of its config (the 36 layers would need 8 GB): the shapes and bounds of the paper-scale run."""
    from entropy import eic_stages, internal_entropy
    from policy import layer_logprobs
    config = AutoConfig.from_pretrained(os.path.join(CONFIG_DIR, "qwen3-4b.json"), num_hidden_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    resp = torch.zeros(2, 12, dtype=torch.bool)
    resp[:, 6:] = True
    res = internal_entropy(model, ids, resp)
    assert len(res["dH_ffn"]) == 2 and len(res["layer"]) == 3
    assert all(0 <= h <= torch.log(torch.tensor(float(config.vocab_size))) + 1e-3 for h in res["layer"])
    assert set(eic_stages(res["dH_ffn"])) >= {"boundary_layer", "suggested_layer"}
    with torch.no_grad():
        lp, ent = layer_logprobs(model, ids, torch.ones_like(ids), 0, mask=resp)
    assert lp.shape == ent.shape == (2, 12) and (lp[resp[:, 1:].nonzero(as_tuple=True)[0], 0] <= 0).all()
