"""bupo.py: the internal layer policy against HF hidden states, the two phases, layer=auto, resume."""
import os
import signal
from dataclasses import replace

import pytest
import torch

import bupo
import checkpoints
import grpo
from conftest import tiny_model
from distributed import Policy
from test_grpo import FakeTok, fake_load, text_reward, tiny_cfg


@pytest.mark.parametrize("k", [0, 1])
def test_layer_logprobs_equal_the_hidden_states_route(arch, k):
    model = tiny_model(arch, num_hidden_layers=3)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(k))
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    logp, ent = bupo.layer_logprobs(model, ids, att, k, temperature=0.8)
    h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[k + 1]  # authors: lm_head(hidden_states[k+1])
    logits = model.lm_head(h)[:, :-1] / 0.8
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), atol=1e-5, rtol=1e-5)


def test_early_exit_runs_only_layers_up_to_k():
    model = tiny_model("qwen3", num_hidden_layers=4)
    ran = []
    for l, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, l=l: ran.append(l))
    bupo.layer_logprobs(model, torch.randint(3, 97, (1, 5)), None, 1)
    assert ran == [0, 1]


def test_layer_out_of_range_is_a_clear_error():
    model = tiny_model("llama")  # 3 layers: k in 0..1
    for k in (-1, 2, 7):
        with pytest.raises(ValueError, match="0..1"):
            bupo.layer_logprobs(model, torch.randint(3, 97, (1, 5)), None, k)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_phase_one_update_moves_only_layers_up_to_k_and_the_unembedding():
    model = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=False)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=4, lr=1e-2, weight_decay=0.01)
    from rollout import generate
    prompts = [[5, 6, 7, 8]] * 4
    r = generate(model, prompts, max_new_tokens=6, seed=0)
    batch = grpo.make_batch(prompts, r, 0, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    before = snapshot(model)
    policy = bupo.layer_policy(1)
    runner = Policy(model)
    old, _ = grpo.policy_logprobs(policy, runner, batch, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    grpo.ppo_update(runner, opt, policy, batch, old, None, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.layers.0.") for n in changed) and any(n.startswith("model.layers.1.") for n in changed)
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in changed)


def test_switch_happens_exactly_after_inter_steps(tmp_path):
    cfg = bupo.BuPOConfig(**{**vars(tiny_cfg(tmp_path, steps=4)), "inter_steps": 2, "layer": "1"})
    cfg = replace(cfg, profile_every=2, profile_samples=2)
    hist, _, _ = bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())
    assert [m["phase"] for m in hist] == ["internal", "internal", "full", "full"]
    assert ["profile_layer" in m for m in hist] == [False, True, False, True] and len(hist[1]["profile_layer"]) == 4
    assert all("entropy_layer1" in m and "entropy_output" in m for m in hist)


def test_policy_used_by_each_step(tmp_path, monkeypatch):
    """The update's old and new log-probs come from pi_k for steps < s_inter, from the output policy after."""
    seen = []
    real_update = grpo.ppo_update
    monkeypatch.setattr(grpo, "ppo_update", lambda model, opt, policy, *a: (seen.append(getattr(policy, "__qualname__", "")), real_update(model, opt, policy, *a))[1])
    cfg = bupo.BuPOConfig(**{**vars(tiny_cfg(tmp_path, steps=3)), "inter_steps": 1, "layer": "0"})
    bupo.train_bupo(cfg, 0, tiny_model("llama"), FakeTok())
    assert ["layer_policy" in q for q in seen] == [True, False, False]


def test_auto_layer_is_the_eic_suggestion(tmp_path, monkeypatch):
    model = tiny_model("qwen3", num_hidden_layers=3)
    cfg = bupo.BuPOConfig(**{**vars(tiny_cfg(tmp_path)), "layer": "auto", "profile_samples": 3})
    prof = bupo.entropy_profile(model, FakeTok(), cfg)
    assert bupo.resolve_layer(cfg, model, FakeTok()) == bupo.eic_stages(prof["dH_ffn"])["suggested_layer"]
    monkeypatch.setattr(bupo, "entropy_profile", lambda *a: {"dH_ffn": [0.9, 0.8, -0.01, -0.9]})
    assert bupo.resolve_layer(cfg, model, FakeTok()) == 1  # exploration ends at layer 1
    assert bupo.resolve_layer(replace(cfg, layer="2"), model, FakeTok()) == 2


def test_tiny_end_to_end_with_interruption_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "problem_reward", text_reward)
    base = {**vars(tiny_cfg(tmp_path / "a", steps=3)), "inter_steps": 2, "layer": "1"}
    full, _, _ = bupo.train_bupo(bupo.BuPOConfig(**base), 1, tiny_model("llama"), FakeTok())

    def ctrl_c(step, runner, batch, m):
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)
    cfg_b = bupo.BuPOConfig(**{**base, "out": str(tmp_path / "b")})
    real_on = bupo.log_entropies
    monkeypatch.setattr(bupo, "log_entropies", lambda runner, batch, k, cfg, m: (real_on(runner, batch, k, cfg, m), ctrl_c(m["step"], runner, batch, m)))
    part, _, _ = bupo.train_bupo(cfg_b, 1, tiny_model("llama"), FakeTok())
    assert len(part) == 1
    monkeypatch.setattr(bupo, "log_entropies", real_on)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = bupo.train_bupo(replace(cfg_b, resume=True), 1, None, None)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert all(m["pg_loss"] != 0 for m in full)  # real updates: layer 2's first Adam step comes after the resume


def test_experiment_writes_figures_and_table(tmp_path, monkeypatch):
    """The main job end to end on a tiny model: both runs, the comparison figure, profiles and table."""
    monkeypatch.setattr(bupo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    cfg = bupo.BuPOConfig(**{**vars(tiny_cfg(tmp_path, steps=2, eval_every=1)), "inter_steps": 1, "layer": "1",
                             "profile_samples": 2, "profile_every": 0, "out": str(tmp_path / "exp")})
    bupo.experiment(cfg)
    out = tmp_path / "exp"
    for f in ("comparison.png", "profiles.png", "curves.png", "results.md", "results.json", "bupo/metrics.jsonl", "grpo/metrics.jsonl"):
        assert (out / f).exists(), f
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | arithmetic | avg |") and [r.split("|")[1].strip() for r in table[2:]] == ["initial", "BuPO", "GRPO"]
    before = (out / "bupo" / "metrics.jsonl").read_text()
    trained = []
    monkeypatch.setattr(bupo, "train_bupo", lambda *a, **k: trained.append(1))
    bupo.experiment(replace(cfg, resume=True))  # both runs finished: resume only re-reports
    assert trained == [] and (out / "bupo" / "metrics.jsonl").read_text() == before
