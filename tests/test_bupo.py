"""bupo.py: which weights each phase moves, the switch, layer=auto, resume, and the multi-seed experiment on tiny models."""
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

import bupo
import checkpoints
import grpo
import step
from cli import InputError, Stopped
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model
from distributed import Policy
from policy import Batch, layer_policy, pad_rows, upper_parameters
from rollout import generate


def test_phase_one_update_moves_only_layers_up_to_k_and_the_unembedding():
    model = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=False)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=4, lr=1e-2, weight_decay=0.0, precision="float32")
    prompts = [[5, 6, 7, 8]] * 4
    r = generate(model, prompts, max_new_tokens=6, seed=0)
    batch = Batch(*pad_rows(prompts, [r.tokens[i, :r.lengths[i]].tolist() for i in range(4)], 0), torch.tensor([1.0, -1.0, 0.5, -0.5]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, runner = layer_policy(1), Policy(model)
    old, ent = step.policy_logprobs(policy, runner, batch, cfg)
    step.ppo_update(runner, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), policy, batch, old, None, ent, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.layers.0.") for n in changed) and any(n.startswith("model.layers.1.") for n in changed)
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in changed)


@pytest.mark.parametrize("steps,moved", [(2, False), (3, True)])
def test_the_upper_layers_move_only_after_the_switch(tmp_path, monkeypatch, steps, moved):
    """inter_steps=2: after 2 steps layer 2 (above k=1) is untouched; one full step later it has moved."""
    monkeypatch.setattr(step, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, steps=steps, inter_steps=2, layer="1", profile_samples=2)
    hist, trained, _ = bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())
    init = tiny_model("llama")
    layer2 = lambda m: [p for n, p in m.named_parameters() if n.startswith("model.layers.2.")]
    assert any(not torch.equal(a, b) for a, b in zip(layer2(trained), layer2(init))) == moved
    assert all(m["updates"] == 2 for m in hist) and "profile_layer" in hist[-1] and len(hist[-1]["profile_layer"]) == 4
    assert all("entropy_layer1" in m and "entropy_output" in m for m in hist)


@pytest.mark.parametrize("method", ["grpo_frozen", "grpo_layer_lr"])
def test_layer_aware_controls(tmp_path, monkeypatch, method):
    """Table 11's controls over a phase 1 of 2 steps (no weight decay): (a) the layers above k and the final norm stay
    exactly as they were while the rest learns; (b) they move 0.1x as far (Adam moves an element ~lr an update)."""
    monkeypatch.setattr(step, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, steps=2, inter_steps=2, layer="1", methods=method, weight_decay=0.0, profile_every=0)
    hist, trained, _ = bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())
    init = tiny_model("llama")
    upper = set(upper_parameters(init.named_parameters(), 1))
    delta = {n: (p - q).abs().max().item() for (n, p), (_, q) in zip(trained.named_parameters(), init.named_parameters())}
    lower, moved = max(v for n, v in delta.items() if n not in upper), max(delta[n] for n in upper)
    assert lower > 3.5 * cfg.lr  # 4 Adam updates of ~lr each on the layers pi_k reaches
    assert moved == 0 if method == "grpo_frozen" else 0.09 < moved / lower < 0.11
    assert all(m["phase"] == "internal" and m["updates"] == 2 for m in hist)


def test_the_final_norm_variant_is_the_logit_lens_of_h_k():
    """Table 5's variant: pi_k = softmax(lm_head(norm(h_k))), against HF's hidden_states[k+1] through the final norm."""
    model = tiny_model("qwen3")
    g = torch.Generator().manual_seed(0)
    ids, att, resp = pad_rows([[5, 6, 7], [8, 9]], [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 6)], 0)
    with torch.no_grad():
        lp, _ = layer_policy(1, final_norm=True)(model, ids, att, 1.0, resp)
        raw, _ = layer_policy(1)(model, ids, att, 1.0, resp)
        h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[2]  # the raw residual after layer 1
        ref = model.lm_head(model.model.norm(h)).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # token t+1's
    m = resp[:, 1:]
    assert torch.allclose(lp[:, 1:][m], ref[m], atol=1e-5) and not torch.allclose(raw[:, 1:][m], ref[m], atol=1e-2)


def test_auto_layer_is_the_end_of_exploration(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, layer="auto")
    monkeypatch.setattr(bupo, "entropy_profile", lambda *a: {"dH_ffn": [0.9, 0.8, -0.01, -0.9]})
    assert bupo.resolve_layer(cfg, None, None) == 1  # FFNs 0 and 1 raise the entropy, 2 is flat, 3 converges
    assert bupo.resolve_layer(replace(cfg, layer="2"), None, None) == 2


def test_tiny_end_to_end_with_interruption_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "problem_reward", text_reward)
    base = dict(steps=3, inter_steps=2, layer="1", profile_samples=2, save_every=0)
    full, _, _ = bupo.train_bupo(tiny_cfg(tmp_path / "a", bupo.BuPOConfig, **base), 1, tiny_model("llama"), FakeTok())
    cfg_b = tiny_cfg(tmp_path / "b", bupo.BuPOConfig, **base)
    real = bupo.readout_entropies
    monkeypatch.setattr(bupo, "readout_entropies", lambda *a: (os.kill(os.getpid(), signal.SIGINT), real(*a))[1])
    with pytest.raises(Stopped, match="after step 0 of 3"):
        bupo.train_bupo(cfg_b, 1, tiny_model("llama"), FakeTok())
    monkeypatch.setattr(bupo, "readout_entropies", real)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = bupo.train_bupo(replace(cfg_b, resume=True), 1, None, None)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert all(m["pg_loss"] != 0 for m in full)  # real updates: layer 2's first Adam step comes after the resume


def tiny_experiment(tmp_path, monkeypatch, **kw):
    monkeypatch.setattr(step, "problem_reward", text_reward)
    monkeypatch.setattr(bupo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(bupo, "model_config", lambda *a: tiny_model("llama").config)
    return tiny_cfg(tmp_path, bupo.BuPOConfig, **{**dict(steps=2, eval_every=1, inter_steps=1, layer="1", profile_samples=2,
                                                           seeds="2", out=str(tmp_path / "exp")), **kw})


def test_experiment_pairs_seeds_and_reports_intervals(tmp_path, monkeypatch):
    """Both methods on 2 paired seeds: per-seed results, the paired difference and its interval, the figures."""
    cfg = tiny_experiment(tmp_path, monkeypatch)
    bupo.experiment(cfg)
    out = tmp_path / "exp"
    for f in ("comparison.png", "profiles.png", "results.md", "results.json", "initial.json",
              "seed0/bupo/metrics.jsonl", "seed1/grpo/metrics.jsonl"):
        assert (out / f).exists(), f
    res = json.load(open(out / "results.json"))
    assert set(res["per_seed"]) == {"BuPO", "GRPO"} and set(res["per_seed"]["GRPO"]) == {"0", "1"}
    d = [res["per_seed"]["BuPO"][s] - res["per_seed"]["GRPO"][s] for s in ("0", "1")]
    assert res["paired"]["BuPO"]["mean"] == pytest.approx(sum(d) / 2)
    grpo0 = [json.loads(x) for x in open(out / "seed0" / "grpo" / "metrics.jsonl")]
    bupo0 = [json.loads(x) for x in open(out / "seed0" / "bupo" / "metrics.jsonl")]
    assert grpo0[0]["reward_mean"] == bupo0[0]["reward_mean"]  # paired: same start, same data and draws at step 0
    assert [m["phase"] for m in bupo0] == ["internal", "full"] and [m["phase"] for m in grpo0] == ["full", "full"]
    table = (out / "results.md").read_text()
    assert "| BuPO − GRPO (paired) |" in table and "seed 0 | seed 1" in table
    assert "reward: math (rewards.py)" in table and json.loads((out / "results.json").read_text())["reward"] == "math"
    assert not any((out / f"seed{s}" / r / "checkpoint").exists() for s in (0, 1) for r in ("bupo", "grpo"))  # no 1.6 GB leftovers


def test_experiment_resume_skips_finished_seeds(tmp_path, monkeypatch):
    cfg = tiny_experiment(tmp_path, monkeypatch, seeds="2")
    real = bupo.train_bupo
    calls = []

    def stop_in_seed_1(run_cfg, *a, **k):
        calls.append(run_cfg.out)
        if run_cfg.seed == 1:
            raise KeyboardInterrupt  # killed during seed 1
        return real(run_cfg, *a, **k)
    monkeypatch.setattr(bupo, "train_bupo", stop_in_seed_1)
    with pytest.raises(KeyboardInterrupt):
        bupo.experiment(cfg)
    assert len(calls) == 3  # seed 0: GRPO, BuPO; then seed 1's first run
    with pytest.raises(InputError, match="holds a run already"):
        bupo.experiment(cfg)  # not without --resume
    calls.clear()
    monkeypatch.setattr(bupo, "train_bupo", lambda run_cfg, *a, **k: (calls.append(run_cfg.out), real(run_cfg, *a, **k))[1])
    bupo.experiment(replace(cfg, resume=True))
    assert sorted(calls) == sorted(str(tmp_path / "exp" / "seed1" / r) for r in ("grpo", "bupo"))  # seed 0 is not trained again
    assert set(json.load(open(tmp_path / "exp" / "results.json"))["per_seed"]["BuPO"]) == {"0", "1"}


def test_sweep_and_methods(tmp_path, monkeypatch):
    cfg = tiny_experiment(tmp_path, monkeypatch, seeds="0,", sweep="inter_steps=0,1", methods="bupo")
    bupo.experiment(cfg)
    res = json.load(open(tmp_path / "exp" / "results.json"))
    assert set(res["per_seed"]) == {"BuPO inter_steps=0", "BuPO inter_steps=1"} and res["paired"] == {}
    assert (tmp_path / "exp" / "sweep.png").exists()
    for bad, match in [(dict(sweep="depth=1"), "--sweep must be"), (dict(sweep="layer=1,9"), "out of range"),
                       (dict(methods="dpo"), "--methods"), (dict(methods="grpo,grpo"), "--methods"), (dict(seeds="0"), "--seeds"), (dict(layer="x"), "--layer")]:
        with pytest.raises(InputError, match=match):
            bupo.experiment(replace(cfg, out=str(tmp_path / "bad"), **bad))


def test_logged_entropies_are_those_of_the_policies_trained():
    """The per-step entropy readout against HF's forward, as phase 1 and GRPO train them in a bf16 run: pi_k's from
    hidden_states[k+1] in float32 through the lm_head under bf16 autocast, the output policy's from HF's logits under
    the autocast; both token means over the positions that produce response tokens, at the rollout temperature."""
    model = tiny_model("qwen3")
    g = torch.Generator().manual_seed(1)
    ids, att, resp = pad_rows([torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 3, 6)],
                              [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 7, 2)], 0)
    got = bupo.readout_entropies(model, ids, att, resp, 0.9, [1], "bfloat16")
    pos = resp[:, 1:]  # position t produces token t+1
    mean_entropy = lambda logits: (-(logits.float() / 0.9).softmax(-1) * (logits.float() / 0.9).log_softmax(-1)).sum(-1)[:, :-1][pos].mean()
    with torch.no_grad():
        h1 = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert got[1] == pytest.approx(mean_entropy(model.lm_head(h1)).item(), rel=2e-3)  # bf16 logits: as below
            logits = model(ids, attention_mask=att).logits
    assert got["output"] == pytest.approx(mean_entropy(logits).item(), rel=2e-3)  # bf16: HF and ours round differently (6e-4)


def test_every_method_of_the_paper_in_one_experiment(tmp_path, monkeypatch):
    """Table 1's methods and the ablations (Tables 5, 11) on 2 paired seeds, with the sampled metric: Avg@K per seed
    and its interval, each method's paired difference from GRPO, the Pass@K curve (pass@1 = Avg@K exactly)."""
    cfg = tiny_experiment(tmp_path, monkeypatch, methods=",".join(bupo.METHODS), eval_samples=4, eval_samples_limit=2)
    bupo.experiment(cfg)
    out = tmp_path / "exp"
    res = json.load(open(out / "results.json"))
    names = {name for name, _ in bupo.METHODS.values()}
    assert set(res["per_seed"]) == names and set(res["paired"]) == names - {"GRPO"}
    assert set(res["pass_at_k"]) == names | {"initial"} and list(res["pass_at_k"]["PPO"]) == ["1", "2", "4"]
    for method, (name, est) in bupo.METHODS.items():
        hist = [json.loads(x) for x in open(out / "seed1" / method / "metrics.jsonl")]
        assert res["sampled"]["per_seed"][name]["1"] == hist[-1]["sampled/avg/avg@4"] == hist[-1]["sampled/avg/pass@1"]
        assert ("critic_loss" in hist[0]) == (est == "gae")
        assert [m["phase"] for m in hist] == (["internal", "full"] if method in bupo.INTERNAL else ["full", "full"])
    assert json.load(open(out / "seed0" / "ppo" / "config.json"))["adv_estimator"] == "gae"
    curve = list(res["pass_at_k"]["initial"].values())
    assert curve == sorted(curve)  # Pass@K never falls with K
    text = (out / "results.md").read_text()
    assert "Avg@4" in text and "| PPO − GRPO (paired) |" in text and "K=4" in text
    assert (out / "passk.png").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_experiment_keeps_its_work_and_resumes(tmp_path, monkeypatch, sig):
    """Ctrl-C or SIGTERM in the first run's step 0: exit 130, nothing reported, the run's checkpoint kept; --resume
    continues it from step 1 and finishes the experiment with the uninterrupted run's metrics."""
    import cli
    cfg = tiny_experiment(tmp_path, monkeypatch, seeds="0,")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in [("steps", 2), ("eval_every", 1), ("inter_steps", 1), ("layer", "1"),
            ("profile_samples", 2), ("seeds", "0,"), ("task", "arithmetic"), ("eval_data", "arithmetic"), ("eval_limit", 4),
            ("eval_max_new_tokens", 4), ("prompts_per_step", 4), ("group_size", 4), ("mini_batch_prompts", 2), ("micro_batch", 5),
            ("max_new_tokens", 6), ("precision", "float32"), ("lr", 0.01), ("eval_samples", 0), ("out", cfg.out)]]
    real, calls = bupo.readout_entropies, []

    def kill_once(*a):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return real(*a)
    monkeypatch.setattr(bupo, "readout_entropies", kill_once)
    with pytest.raises(SystemExit) as stop:
        cli.run_main(bupo.main, argv)
    assert stop.value.code == 130
    out = tmp_path / "exp"
    assert not (out / "results.md").exists() and (out / "seed0" / "grpo" / "checkpoint" / "trainer.pt").exists()
    assert len((out / "seed0" / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as refused:
        cli.run_main(bupo.main, argv + ["--resume", "--steps=3"])  # a finished run would not have step 3
    assert refused.value.code == 2
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    cli.run_main(bupo.main, argv + ["--resume"])
    grpo0 = [json.loads(x) for x in open(out / "seed0" / "grpo" / "metrics.jsonl")]
    assert [m["step"] for m in grpo0] == [0, 1] and (out / "results.md").exists()
    assert not (out / "seed0" / "grpo" / "checkpoint").exists()


def test_fig7_output_entropy_is_the_whole_batch_before_the_update(tmp_path, monkeypatch):
    """Issue 30.9: in phase 1 (pi_k trained) the logged output entropy is the output policy's token mean over every row
    of the step, from the weights before the update, as the authors log it; in GRPO it is the logged entropy."""
    import copy
    import distributed
    from policy import output_policy
    from problems import task_problems
    monkeypatch.setattr(step, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, lr=0.05)
    model = tiny_model("llama").train()
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = task_problems("arithmetic", 0, 0, "train")
    batch, m = step.train_step(Policy(model), FakeTok(), opt, None, problems, cfg, 0, layer_policy(1), distributed.init())
    _, ent = step.policy_logprobs(output_policy, Policy(before), batch, cfg)
    resp = batch.response_mask
    assert m["entropy_output"] == pytest.approx(((ent * resp).sum() / resp.sum()).item(), rel=1e-5)
    assert m["entropy_output"] != pytest.approx(m["entropy"], rel=1e-3)  # that one is pi_1's
    _, m2 = step.train_step(Policy(model), FakeTok(), opt, None, problems, cfg, 1, output_policy, distributed.init())
    assert m2["entropy_output"] == m2["entropy"]
