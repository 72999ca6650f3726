"""bupo.py: which weights each phase moves, the switch, layer=auto, resume
(the experiment: tests/test_experiment.py)."""
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

import bupo
import checkpoints
import grpo
import update
from cli import Stopped
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model
from distributed import Wrapped
from policy import Batch, layer_policy, pad_rows, upper_parameters
from rollout import generate


def test_phase_one_update_moves_only_layers_up_to_k_and_the_unembedding():
    model = tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=False)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=4, lr=1e-2, weight_decay=0.0,
                          precision="float32")
    prompts = [[5, 6, 7, 8]] * 4
    r = generate(model, prompts, max_new_tokens=6, seed=0)
    batch = Batch(*pad_rows(prompts, [r.tokens[i, :r.lengths[i]].tolist() for i in range(4)], 0),
                  torch.tensor([1.0, -1.0, 0.5, -0.5]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, runner = layer_policy(1), Wrapped(model)
    old, _ = update.policy_logprobs(policy, runner, batch, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    update.ppo_update(runner, opt, policy, batch, old, None, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert (any(n.startswith("model.layers.0.") for n in changed)
            and any(n.startswith("model.layers.1.") for n in changed))
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in changed)


@pytest.mark.parametrize("steps,moved", [(2, False), (3, True)])
def test_the_upper_layers_move_only_after_the_switch(tmp_path, monkeypatch, steps, moved):
    """inter_steps=2: after 2 steps layer 2 (above k=1) is untouched; one full step later it has moved."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, steps=steps, inter_steps=2, layer=1, profile_samples=2)
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
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, steps=2, inter_steps=2, layer=1, methods=method, weight_decay=0.0,
                   profile_every=0)
    hist, trained, _ = bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())
    init = tiny_model("llama")
    upper = set(upper_parameters(init.named_parameters(), 1))
    delta = {n: (p - q).abs().max().item()
             for (n, p), (_, q) in zip(trained.named_parameters(), init.named_parameters())}
    lower, moved = max(v for n, v in delta.items() if n not in upper), max(delta[n] for n in upper)
    assert lower > 3.5 * cfg.lr  # 4 Adam updates of ~lr each on the layers pi_k reaches
    assert moved == 0 if method == "grpo_frozen" else 0.09 < moved / lower < 0.11
    assert all(m["phase"] == "internal" and m["updates"] == 2 for m in hist)
    assert [m["lr_upper"] for m in hist] == [cfg.lr * {"grpo_frozen": 0.0, "grpo_layer_lr": 0.1}[method]] * 2


def test_the_upper_layers_lr_is_logged(tmp_path, monkeypatch):
    """Table 11 (b) with s_inter = 1: lr_upper is 0.1 lr in phase 1, lr after it, beside the logged lr (the other
    group's); a run without an upper group (BuPO) logs none."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    kw = dict(steps=2, inter_steps=1, layer=1, weight_decay=0.0, profile_every=0, save_every=0)
    hist, _, _ = bupo.train_bupo(tiny_cfg(tmp_path / "a", bupo.BuPOConfig, methods="grpo_layer_lr", **kw), 1,
                                 tiny_model("llama"), FakeTok())
    assert [(m["lr"], m["lr_upper"]) for m in hist] == [(1e-2, 1e-2 * 0.1), (1e-2, 1e-2)]
    hist, _, _ = bupo.train_bupo(tiny_cfg(tmp_path / "b", bupo.BuPOConfig, **kw), 1, tiny_model("llama"), FakeTok())
    assert not any("lr_upper" in m for m in hist)


def test_the_final_norm_variant_is_the_logit_lens_of_h_k():
    """Table 5's variant: pi_k = softmax(lm_head(norm(h_k))), against HF's hidden_states[k+1] through the final norm."""
    model = tiny_model("qwen3")
    g = torch.Generator().manual_seed(0)
    ids, att, resp = pad_rows([[5, 6, 7], [8, 9]],
                              [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 6)], 0)
    with torch.no_grad():
        lp, _ = layer_policy(1, final_norm=True)(model, ids, att, 1.0, resp)
        raw, _ = layer_policy(1)(model, ids, att, 1.0, resp)
        h = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[2]  # the raw residual after layer 1
        # token t+1's
        ref = model.lm_head(model.model.norm(h)).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    m = resp[:, 1:]
    assert torch.allclose(lp[:, 1:][m], ref[m], atol=1e-5) and not torch.allclose(raw[:, 1:][m], ref[m], atol=1e-2)


def test_auto_layer_is_the_end_of_exploration(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, layer=None)
    monkeypatch.setattr(bupo, "entropy_profile", lambda *a: {"dH_ffn": [0.9, 0.8, -0.01, -0.9]})
    assert bupo.resolve_layer(cfg, None, None) == 1  # FFNs 0 and 1 raise the entropy, 2 is flat, 3 converges
    assert bupo.resolve_layer(replace(cfg, layer=2), None, None) == 2


def test_tiny_end_to_end_with_interruption_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(update, "problem_reward", text_reward)
    base = dict(steps=3, inter_steps=2, layer=1, profile_samples=2, save_every=0)
    full, _, _ = bupo.train_bupo(tiny_cfg(tmp_path / "a", bupo.BuPOConfig, **base), 1, tiny_model("llama"), FakeTok())
    cfg_b = tiny_cfg(tmp_path / "b", bupo.BuPOConfig, **base)
    real = bupo.readout_entropies
    monkeypatch.setattr(bupo, "readout_entropies",
                        lambda *a, **kw: (os.kill(os.getpid(), signal.SIGINT), real(*a, **kw))[1])
    with pytest.raises(Stopped, match="after step 0 of 3"):
        bupo.train_bupo(cfg_b, 1, tiny_model("llama"), FakeTok())
    monkeypatch.setattr(bupo, "readout_entropies", real)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = bupo.train_bupo(replace(cfg_b, resume=True), 1, None, None)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}
    assert [strip(m) for m in resumed] == [strip(m) for m in full]
    assert all(m["pg_loss"] != 0 for m in full)  # real updates: layer 2's first Adam step comes after the resume


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
    mean_entropy = lambda logits: (-(logits.float() / 0.9).softmax(-1)
                                   * (logits.float() / 0.9).log_softmax(-1)).sum(-1)[:, :-1][pos].mean()
    with torch.no_grad():
        h1 = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert got[1] == pytest.approx(mean_entropy(model.lm_head(h1)).item(), rel=2e-3)  # bf16 logits: as below
            logits = model(ids, attention_mask=att).logits
    # bf16: HF and ours round differently (6e-4)
    assert got["output"] == pytest.approx(mean_entropy(logits).item(), rel=2e-3)


def test_fig7_output_entropy_is_the_whole_batch_before_the_update(tmp_path, monkeypatch):
    """Issue 30.9: in phase 1 (pi_k trained) the logged output entropy is the output policy's token mean over every row
    of the step, from the weights before the update, as the authors log it; in GRPO it is the logged entropy."""
    import copy
    import distributed
    from policy import output_policy
    from problems import task_problems
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, bupo.BuPOConfig, lr=0.05)
    model = tiny_model("llama").train()
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = task_problems("arithmetic", 0, 0, "train")
    trainer = grpo.Trainer(Wrapped(model), FakeTok(), opt)
    batch, m = grpo.train_step(trainer, problems, cfg, 0, layer_policy(1), distributed.init())
    _, ent = update.policy_logprobs(output_policy, Wrapped(before), batch, cfg)
    resp = batch.response_mask
    assert m["entropy_output"] == pytest.approx(((ent * resp).sum() / resp.sum()).item(), rel=1e-5)
    assert m["entropy_output"] != pytest.approx(m["entropy"], rel=1e-3)  # that one is pi_1's
    _, m2 = grpo.train_step(trainer, problems, cfg, 1, output_policy, distributed.init())
    assert m2["entropy_output"] == m2["entropy"]


def test_bupo_py_trains_one_bupo_run(tmp_path, monkeypatch, capsys):
    """`python bupo.py` is one BuPO run (as grpo.py is one GRPO run): phase 1 on pi_k, then GRPO, in one run dir."""
    import cli
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(bupo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(bupo, "model_config", lambda *a: tiny_model("llama").config)
    out = tmp_path / "one"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in [("steps", 2), ("eval_every", 1), ("inter_steps", 1),
            ("layer", "1"), ("profile_every", 0), ("task", "arithmetic"), ("eval_data", "arithmetic"),
            ("eval_limit", 4), ("eval_max_new_tokens", 4), ("prompts_per_step", 4), ("group_size", 4),
            ("mini_batch_prompts", 2), ("micro_batch", 5), ("max_new_tokens", 6), ("precision", "float32"),
            ("lr", 0.01), ("eval_samples", 0), ("out", out)]]
    cli.run_main(bupo.main, argv)
    hist = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["phase"] for m in hist] == ["internal", "full"] and all("entropy_layer1" in m for m in hist)
    assert json.load(open(out / "config.json"))["layer"] == 1 and "BuPO, k=1, s_inter=1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.run_main(bupo.main, argv[:3] + ["--layer=9"] + argv[4:])
    assert e.value.code == 2  # k out of range: one line, before the run dir is claimed
    saved = json.load(open(out / "config.json"))
    json.dump(saved | {"layer": "1"}, open(out / "config.json", "w"))  # a run of the code that kept --layer as text
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(bupo.main, ["--resume", f"--out={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "holds a run with other settings: layer ('1' there, 1 now)" in err
