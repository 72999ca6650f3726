"""grpo.py: the PPO update against hand computations, the loop, resume, run-dir safety and NaN handling on tiny models;
one step on the real default model."""
import copy
import json
import os
import signal
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import decode
import distributed
import evaluate
import grpo
import policy
import update
from cli import Diverged, InputError, Stopped
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model
from distributed import Wrapped
from loss import aggregate, kl_penalty, policy_loss
from policy import Batch, output_policy, pad_rows
from rollout import generate

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
strip = lambda hist: [{k: v for k, v in m.items() if not k.startswith("time")} for m in hist]


def fixed_batch(model, G=4, prompts=((5, 6, 7, 8), (9, 10, 11)), seed=0):
    """Two groups of sampled responses with hand-set advantages."""
    rows = [list(p) for p in prompts for _ in range(G)]
    r = generate(model, rows, max_new_tokens=6, seed=seed, eos_token_id=[5, 6])
    responses = [r.tokens[i, :r.lengths[i]].tolist() for i in range(len(rows))]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.2, 0.9, -1.0][:len(rows)])
    return Batch(*pad_rows(rows, responses, 0), adv)


class GradRecorder:
    """An optimizer stand-in: records each mini-batch's gradients, changes nothing."""
    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def update_grads(model, batch, cfg, **kw):
    runner, rec = Wrapped(model), GradRecorder(model)
    old, _ = update.policy_logprobs(output_policy, runner, batch, cfg)
    stats, _ = update.ppo_update(runner, rec, output_policy, batch, old, kw.pop("ref", None), cfg, **kw)
    return rec.grads, stats, old


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_add_up_to_the_mini_batch_gradient(agg):
    """Gradient accumulation over micro-batches of 1, 3 or 8 rows gives the gradient of the whole mini-batch."""
    model = tiny_model("llama")
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=2, loss_agg=agg, max_new_tokens=6, precision="float32")
    grads = [update_grads(model, batch, replace(cfg, micro_batch=mb))[0][0] for mb in (1, 3, 8)]
    for g in grads[:2]:
        for n in g:
            torch.testing.assert_close(g[n], grads[2][n], atol=1e-6, rtol=1e-4)


def test_on_policy_first_mini_batch_equals_a_separate_old_pass():
    """The first mini-batch's old log-probs taken from the update itself (detached) change nothing: same stats and
    weights, to float rounding (the old pass groups rows into other micro-batches, so its products have other
    shapes)."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, max_new_tokens=6, precision="float32",
                          clip_low=0.1)
    runs = []
    for on_policy in (True, False):
        m = tiny_model("qwen3")
        runner, opt = Wrapped(m), torch.optim.AdamW(m.parameters(), lr=1e-2)
        rows = torch.arange(4 if on_policy else 0, 8)  # the later mini-batch only, or every row
        old, ent = update.policy_logprobs(output_policy, runner, batch, cfg, rows=rows)
        stats, first = update.ppo_update(runner, opt, output_policy, batch, old, None, cfg, on_policy_first=on_policy)
        runs.append((stats, ent + first, [p.detach().clone() for p in m.parameters()]))
    (s1, e1, p1), (s2, e2, p2) = runs
    assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-7) and s1["approx_kl"] > 1e-2  # the 2nd mini-batch is off-policy
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    # whole updates: Adam turns rounding noise on ~0 gradients into ~lr
    for a, b, p0 in zip(p1, p2, tiny_model("qwen3").parameters()):
        assert (a - b).norm() <= 1e-3 * (a - p0).norm()


def test_ppo_update_returns_the_first_mini_batchs_entropies_and_changes_none_of_its_arguments():
    """Issue 33: ppo_update returns the on-policy first mini-batch's entropies (those of the weights before the update,
    as a separate pass computes them; 0 in the later rows, everywhere without on_policy_first) and writes into none of
    the tensors it is given."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, max_new_tokens=6, precision="float32")
    runner = Wrapped(model)
    _, before = update.policy_logprobs(output_policy, runner, batch, cfg)  # (8, T) every row, before any update
    old, ent = update.policy_logprobs(output_policy, runner, batch, cfg, rows=range(4, 8))
    args = lambda: (old, ent, batch.input_ids, batch.attention_mask, batch.response_mask, batch.advantages)
    given = [t.clone() for t in args()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats, first = update.ppo_update(runner, opt, output_policy, batch, old, None, cfg)
    assert stats["updates"] == 2 and stats["approx_kl"] > 0  # the later mini-batch ran on updated weights
    torch.testing.assert_close(first[:4], before[:4])
    assert first[4:].abs().sum() == 0
    assert all(torch.equal(a, b) for a, b in zip(given, args()))
    _, none = update.ppo_update(runner, torch.optim.AdamW(model.parameters()), output_policy, batch, old, None, cfg,
                                on_policy_first=False)
    assert none.shape == before.shape and none.abs().sum() == 0


def test_logged_entropy_is_the_whole_batch_before_the_update(tmp_path, monkeypatch):
    """The entropy train_step logs is the token mean over every row of the step under the weights before the update:
    the first mini-batch's from the update's on-policy forward, the later ones' from the old-log-prob pass."""
    from problems import task_problems
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, lr=0.05)
    model = tiny_model("llama").train()
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = task_problems("arithmetic", 0, 0, "train")
    trainer = grpo.Trainer(Wrapped(model), FakeTok(), opt)
    batch, m = grpo.train_step(trainer, problems, cfg, 0, output_policy, distributed.init())
    _, ent = update.policy_logprobs(output_policy, Wrapped(before), batch, cfg)
    resp = batch.response_mask
    assert m["updates"] == 2 and m["entropy"] == pytest.approx(((ent * resp).sum() / resp.sum()).item(), rel=1e-5)


def test_kl_term_by_hand():
    """The logged KL is k3 between the policy and the reference on the sampled tokens, token-mean over the
    mini-batch."""
    model, ref = tiny_model("llama"), tiny_model("llama", seed=1)
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=2, micro_batch=3, max_new_tokens=6, precision="float32",
                          kl_coef=0.1)
    ref_logp, _ = update.policy_logprobs(output_policy, Wrapped(ref), batch, cfg)
    _, stats, old = update_grads(model, batch, cfg, ref=ref_logp)
    lp = old[batch.response_mask]  # the policy before the update: the first (only) mini-batch is on-policy
    r = torch.exp(ref_logp[batch.response_mask] - lp)
    k3 = r - 1 - torch.log(r)
    assert (k3 > 10).any()  # this pair of random models has tokens past verl's bound
    # verl's low_var_kl clamps to [-10, 10]
    assert stats["kl"] == pytest.approx(k3.clamp(max=10).mean().item(), rel=1e-5)


def test_kl_estimators_hand_computed():
    """k1 and k3 on hand-set log-probs: log pi = -1, log ref = -2 gives k1 = 1, k3 = e^-1 - 1 + 1 = 0.3679;
    a token 30 nats apart gives k3 = e^30 - 31, clamped to 10."""
    logp, ref = torch.tensor([-1.0, -1.0, -31.0]), torch.tensor([-2.0, -1.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, 0.0, -30.0])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([0.36787944, 0.0, 10.0])
    mask = torch.tensor([[True, True, False]])
    assert aggregate(kl_penalty(logp, ref, "k1")[None], mask).item() == pytest.approx(0.5)


def test_updates_on_a_fixed_batch_lower_the_loss():
    model = tiny_model("qwen3")
    model.train()
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=3, lr=3e-3, max_new_tokens=8,
                          precision="float32")
    batch = fixed_batch(model)
    runner = Wrapped(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    old, _ = update.policy_logprobs(output_policy, runner, batch, cfg)
    losses = [update.ppo_update(runner, opt, output_policy, batch, old, None, cfg, on_policy_first=False)[0]["pg_loss"]
              for _ in range(4)]
    assert losses[-1] < losses[0]


def test_rollout_in_chunks_samples_what_one_call_samples():
    """rollout_batch bounds the KV cache; every row keeps its random draws, so the batch is the same."""
    from problems import task_problems
    model, problems = tiny_model("llama"), task_problems("arithmetic", 3, 0, "train")
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, seed=2)
    whole, res = update.rollout_step(model, FakeTok(), problems, cfg, step=1)
    parts, res2 = update.rollout_step(model, FakeTok(), problems, replace(cfg, rollout_batch=4), step=1)
    for f in ("input_ids", "attention_mask", "response_mask", "advantages"):
        assert torch.equal(getattr(whole, f), getattr(parts, f)), f
    assert all(torch.equal(res[k], res2[k]) for k in res)


def ctrl_c_at(at):
    def on_step(step, *a):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


@pytest.mark.parametrize("kl,est", [(0.0, "grpo"), (0.1, "grpo"), (0.0, "gae"), (0.0, "rloo"),
                                    (0.0, "reinforce_plus_plus")])
def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, kl, est):
    """Also with a KL term: the resumed run's reference is still the initial policy, not the checkpoint's weights;
    with PPO (gae) the critic and its optimizer resume too; every estimator of Table 1 resumes exactly."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    full, _, _ = grpo.train(tiny_cfg(tmp_path / "a", kl_coef=kl, save_every=0, adv_estimator=est),
                            model=tiny_model("llama"), tok=FakeTok())
    cfg = tiny_cfg(tmp_path / "b", kl_coef=kl, save_every=0, adv_estimator=est)
    # at the end of step 1, checkpoint saved on Ctrl-C
    with pytest.raises(Stopped, match="after step 1 of 3, checkpoint saved"):
        grpo.train(cfg, on_step=ctrl_c_at(1), model=tiny_model("llama"), tok=FakeTok())
    assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "run" / "metrics.jsonl")] == [0, 1]
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = grpo.train(replace(cfg, resume=True), model=tiny_model("llama") if kl else None,
                               tok=FakeTok() if kl else None)
    assert strip(resumed) == strip(full)  # bit-identical metrics after the interruption
    # real updates, so resuming restored the optimizer
    assert all(m["reward_std"] > 0 and m["pg_loss"] != 0 for m in full)
    assert not kl or all(m["kl"] > 0 for m in full[1:])
    assert (est == "gae") == all(m.get("critic_loss", 0) > 0 for m in full)
    lines = [json.loads(x) for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [0, 1, 2]


def test_setup_builds_the_trainer_fresh_and_from_a_checkpoint(tmp_path, monkeypatch):
    """Issue 33: setup returns a Trainer (once a 7-tuple): fresh, at step 0 with no metrics, with a KL reference and a
    critic only when asked; resumed, at the checkpoint's step with its weights and the metrics logged before it."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    d = distributed.init()
    cfg = tiny_cfg(tmp_path / "fresh")
    os.makedirs(cfg.out)
    fresh = grpo.setup(cfg, d, tiny_model("llama"), FakeTok())
    assert isinstance(fresh, grpo.Trainer) and fresh.start == 0 and fresh.history == []
    assert fresh.ref is None and fresh.critic is None
    assert isinstance(fresh.tok, FakeTok) and fresh.optimizer.param_groups[0]["lr"] == cfg.lr
    ppo = grpo.setup(replace(cfg, kl_coef=0.1, adv_estimator="gae"), d, tiny_model("llama"), FakeTok())
    assert not any(p.requires_grad for p in ppo.ref.parameters()) and isinstance(ppo.critic[1], torch.optim.AdamW)
    cfg = tiny_cfg(tmp_path / "run", steps=2)
    history, model, _ = grpo.train(cfg, model=tiny_model("llama"), tok=FakeTok())
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed = grpo.setup(replace(cfg, resume=True), d)
    assert resumed.start == 2 and resumed.history == history and [m["step"] for m in history] == [0, 1]
    weights = distributed.plain_model(resumed.runner).parameters()
    assert all(torch.equal(p, q) for p, q in zip(weights, model.parameters()))


def test_run_dirs_are_never_mixed(tmp_path, monkeypatch):
    """A fresh run into a dir holding a run is refused; --overwrite replaces it; --resume needs the same settings,
    except those that may change (steps); no checkpoint to resume is a clear error."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = tiny_cfg(tmp_path, steps=1)
    grpo.train(cfg, model=tiny_model("llama"), tok=FakeTok())
    with pytest.raises(InputError, match="holds a run already.*--resume.*--overwrite"):
        grpo.train(cfg, model=tiny_model("llama"), tok=FakeTok())
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    with pytest.raises(InputError, match=r"other settings: lr \(0.01 there, 0.02 now\)"):
        grpo.train(replace(cfg, resume=True, lr=0.02))
    hist, _, _ = grpo.train(replace(cfg, resume=True, steps=2))  # more steps: allowed
    assert [m["step"] for m in hist] == [0, 1]
    hist, _, _ = grpo.train(replace(cfg, overwrite=True, lr=0.02), model=tiny_model("llama"), tok=FakeTok())
    assert [m["step"] for m in hist] == [0] and json.load(open(tmp_path / "run" / "config.json"))["lr"] == 0.02
    with pytest.raises(InputError, match="no checkpoint"):
        grpo.train(tiny_cfg(tmp_path / "empty", resume=True))


def test_settings_are_checked_before_any_work(tmp_path):
    model = tiny_model("llama")
    bad = {"micro_batch": 0, "group_size": 0, "steps": 0, "clip_low": 2.0, "mini_batch_prompts": 3, "rollout_batch": 6,
           "precision": "fp8", "loss_agg": "mean", "temperature": 0.0}
    for field, value in bad.items():
        with pytest.raises(InputError, match=field.replace("_", "-") if field not in ("loss_agg",) else "aggregation"):
            grpo.check_config(replace(tiny_cfg(tmp_path), **{field: value}), model.config)
    with pytest.raises(InputError, match="no data set 'nope'"):
        grpo.train(tiny_cfg(tmp_path, task="nope"), model=model, tok=FakeTok())
    with pytest.raises(InputError, match="no data set 'nope'"):
        grpo.train(tiny_cfg(tmp_path, eval_data="arithmetic,nope", eval_every=1), model=model, tok=FakeTok())
    assert not (tmp_path / "run").exists()  # refused before the run dir was made


def test_nan_loss_is_skipped_and_reported(tmp_path, capsys):
    def nan_policy(model, ids, att, temperature, mask=None, **kw):
        logp, ent = output_policy(model, ids, att, temperature, mask)
        return logp * float("nan"), ent
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    hist, _, _ = grpo.train(tiny_cfg(tmp_path, steps=1, max_nonfinite=5), policy_for_step=lambda s: nan_policy,
                            model=model, tok=FakeTok())
    assert hist[0]["skipped_updates"] == 2 and hist[0]["updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(Diverged, match="non-finite"):
        grpo.train(tiny_cfg(tmp_path / "2", steps=3, max_nonfinite=2), policy_for_step=lambda s: nan_policy,
                   model=tiny_model("llama"), tok=FakeTok())


def test_one_step_on_the_default_model(default_model, tmp_path):
    """The real model, tokenizer, chat template and reward: one tiny step runs, rewards are graded answers, and (no
    weight decay) the weights move exactly when the loss has a gradient: when the group's rewards differ."""
    model, tok = default_model
    import copy
    start = copy.deepcopy(model)
    cfg = tiny_cfg(tmp_path, steps=1, prompts_per_step=2, group_size=4, mini_batch_prompts=1, micro_batch=4,
                   max_new_tokens=24, lr=1e-5, precision="bfloat16", save_final=False, weight_decay=0.0)
    hist, trained, _ = grpo.train(cfg, model=start, tok=tok)
    m = hist[0]
    assert m["updates"] == 2 and 0 <= m["reward_mean"] <= 1 and m["response_len_mean"] > 1 and m["entropy"] > 0
    moved = [n for (n, p), q in zip(trained.named_parameters(), model.parameters()) if not torch.equal(p, q)]
    if m["reward_std"] > 0:
        assert m["grad_norm"] > 0 and len(moved) > 100
    else:  # every advantage 0: no gradient, and Adam moves nothing
        assert m["grad_norm"] == 0 and moved == []


def test_held_out_set_without_a_limit_is_the_whole_split(tmp_path):
    """--eval-limit 0 means all problems: for arithmetic the whole held-out half (it used to be none, and a
    division by 0)."""
    from distributed import Dist
    from problems import task_problems
    cfg = tiny_cfg(tmp_path, eval_limit=0, eval_max_new_tokens=2)
    m = grpo.run_eval(Wrapped(tiny_model("llama")), FakeTok(), cfg, Dist())
    assert set(m) == {"eval/arithmetic", "eval/avg"} and 0 <= m["eval/avg"] <= 100
    assert len(task_problems("arithmetic", 0, 0, "test")) > 256


def test_sigterm_stops_grpo_py_with_its_checkpoint_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, schedulers, docker stop) is handled like Ctrl-C: the step finishes, a checkpoint is saved, the
    script exits 130 without its "finished" line; --resume then completes the run."""
    import cli
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(grpo, "model_config", lambda *a: tiny_model("llama").config)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    real = grpo.train_step
    monkeypatch.setattr(grpo, "train_step", lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), real(*a, **k))[1])
    argv = ["--steps=3", "--eval-every=0", "--eval-samples=0", "--prompts-per-step=4", "--group-size=4",
            "--mini-batch-prompts=2", "--micro-batch=5", "--max-new-tokens=6", "--precision=float32", "--lr=0.01",
            "--rollout-dtype=", f"--out={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as stop:
        cli.run_main(grpo.main, argv)
    assert stop.value.code == 130 and (tmp_path / "run" / "checkpoint" / "trainer.pt").exists()
    assert "reward" not in capsys.readouterr().out  # no "finished" line
    monkeypatch.setattr(grpo, "train_step", real)
    cli.run_main(grpo.main, argv + ["--resume"])
    assert [json.loads(x)["step"] for x in open(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]


class CallRecorder:
    """A runner that records the rows (token ids) of every forward it runs."""
    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, policy, ids, *args, **kw):
        self.calls.append(ids.tolist())
        return self.runner(policy, ids, *args, **kw)

    def parameters(self):
        return self.runner.parameters()


@pytest.mark.parametrize("micro", [3, 5, 8])
def test_old_logprobs_run_the_updates_micro_batches(micro):
    """The old-log-prob pass runs exactly the update's micro-batches (cut at mini-batch boundaries first), so that
    under bf16 the ratio of unchanged weights is 1 whatever the kernels' blocking, for any --micro-batch; with
    lr 0 every ratio is 1 and nothing is clipped."""
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_batch=micro, max_new_tokens=6, precision="bfloat16",
                          lr=0.0)
    old_pass, update_pass = CallRecorder(Wrapped(model)), CallRecorder(Wrapped(model))
    old, _ = update.policy_logprobs(output_policy, old_pass, batch, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    stats, _ = update.ppo_update(update_pass, opt, output_policy, batch, old, None, cfg, on_policy_first=False)
    assert old_pass.calls == update_pass.calls and len(update_pass.calls) == 2 * -(-4 // micro)
    assert stats["updates"] == 2 and stats["approx_kl"] == 0.0
    assert stats["clip_frac_upper"] == stats["clip_frac_lower"] == 0.0


def one_line_error(main, argv, capsys):
    import cli
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress bars of the work done before the error
    assert e.value.code == 2 and "Traceback" not in err and last.startswith("error: "), err[-2000:]
    return last


def test_run_dirs_survive_what_users_do_to_them(tmp_path, monkeypatch, capsys):
    """Through grpo.py: a corrupt or deleted config.json is refused, with or without --resume, naming a recovery that
    loses nothing (the metrics stay as they were); a truncated trainer state and a full disk at a save are one-line
    errors, the latter keeping the last whole checkpoint."""
    import cli
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(grpo, "model_config", lambda *a: tiny_model("llama").config)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    run = tmp_path / "run"
    argv = ["--steps=2", "--eval-every=0", "--eval-samples=0", "--prompts-per-step=4", "--group-size=4",
            "--mini-batch-prompts=2", "--micro-batch=5", "--max-new-tokens=6", "--precision=float32", "--lr=0.01",
            "--rollout-dtype=", "--save-every=1", f"--out={run}"]
    cli.run_main(grpo.main, argv)
    metrics, good = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()
    (run / "config.json").write_text(good[:40])
    err = one_line_error(grpo.main, argv + ["--resume"], capsys)
    assert "config.json is not valid JSON" in err and "nothing is lost" in err
    (run / "config.json").unlink()
    for extra in (["--resume"], []):
        err = one_line_error(grpo.main, argv + extra, capsys)
        assert "holds outputs" in err and "no config.json" in err and "nothing is lost" in err
    assert (run / "metrics.jsonl").read_text() == metrics
    (run / "config.json").write_text(good)
    trainer = run / "checkpoint" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:200])
    assert "trainer.pt is damaged" in one_line_error(grpo.main, argv + ["--resume", "--steps=3"], capsys)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoints.torch, "save", full)
    err = one_line_error(grpo.main, argv[:-1] + [f"--out={tmp_path / 'run2'}"], capsys)
    assert ("could not save the checkpoint after step 1" in err and "No space left" in err
            and "no checkpoint was kept" in err)
    assert not list((tmp_path / "run2").glob("checkpoint*"))


def test_a_kv_cache_beyond_memory_is_refused_with_the_batch_that_fits():
    """Qwen3-4B's shape at the paper's batch (128 prompts x 8, 8192 new tokens, bf16):
    2 x 1024 x 8192 x 36 layers x 8 KV heads x 128 x 2 bytes = 1237 GB by hand, refused on an 80 GB card with the
    --rollout-batch that fits half of it."""
    from transformers import AutoConfig
    from config import check_rollout_memory, kv_cache_bytes
    qwen3_4b = AutoConfig.for_model("qwen3", num_hidden_layers=36, num_key_value_heads=8, head_dim=128,
                                    hidden_size=2560, num_attention_heads=32)
    assert kv_cache_bytes(qwen3_4b, 1024, 8192, 2) == 2 * 1024 * 8192 * 36 * 8 * 128 * 2 == 1_236_950_581_248
    cfg = grpo.GRPOConfig(rollout_dtype="bfloat16")
    per_row = 2 * 8192 * 36 * 8 * 128 * 2
    fit = int(40e9 // per_row) // 8 * 8  # 32 rows
    with pytest.raises(InputError,
                       match=rf"needs at least 1237.0 GB \(1024 rows x 8192 slots\).* --rollout-batch {fit}$"):
        check_rollout_memory(cfg, qwen3_4b, memory=80e9)
    check_rollout_memory(replace(cfg, rollout_batch=fit), qwen3_4b, memory=80e9)
    with pytest.raises(InputError, match="lower --max-new-tokens or --group-size"):
        check_rollout_memory(replace(cfg, rollout_batch=8), qwen3_4b, memory=4e9)


@pytest.mark.parametrize("dtype", ["", "bfloat16"])
def test_cudas_sampling_flow_kept_across_steps_trains_what_the_per_call_flow_trains(tmp_path, monkeypatch, dtype):
    """CUDA samples with static shapes on a Decoder (and bf16 copy) kept from step to step, refreshed in place, and
    kept through the evaluations, which keep theirs apart and drop them; run so on CPU (eagerly), GRPO's metrics equal
    those of a fresh sampler per call, and steps 1 and 2 reuse step 0's sampler (16 rows, 6 tokens), the evaluation of
    step 1 in between (the evaluations: 4 questions, 4 tokens, before, at 2 and at 3, each building its own)."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    cfg = dict(save_every=0, eval_every=2, rollout_dtype=dtype)
    fresh, _, _ = grpo.train(tiny_cfg(tmp_path / "a", **cfg), model=tiny_model("llama"), tok=FakeTok())
    built, real = [], decode.Decoder
    monkeypatch.setattr(decode, "Decoder", lambda *a: built.append(a[1:4]) or real(*a))
    static = lambda *a, **kw: generate(*a, **{**kw, "static": True, "sync_every": 3})
    stale = []

    def rollout(model, *a, **kw):  # the training rollout: the kept copy it sampled with holds today's weights
        r = static(model, *a, **kw)
        if dtype:
            copy = next(reversed(decode._COPIES.values()))[1]
            stale.extend(not torch.equal(c, p.to(c.dtype)) for c, p in zip(copy.parameters(), model.parameters()))
        return r
    monkeypatch.setattr(update, "generate", rollout)
    monkeypatch.setattr(evaluate, "generate", static)
    kept, _, _ = grpo.train(tiny_cfg(tmp_path / "b", **cfg), model=tiny_model("llama"), tok=FakeTok())
    assert strip(kept) == strip(fresh) and "eval/avg" in kept[1] and kept[0]["reward_std"] > 0
    assert built == [(4, 128, 4), (16, 128, 6), (4, 128, 4), (4, 128, 4)]
    assert len(stale) == (3 * 29 if dtype else 0) and not any(stale)


def hf_update_grads(model, batch, cfg, mini):
    """The trusted reference of one update's gradients: each row through Hugging Face's plain forward alone (no
    padding, no prompt sharing, no chunking), log_softmax(logits / T), verl's loss over the whole mini-batch of rows
    `mini`, clipped."""
    ids, resp = batch.input_ids[mini], batch.response_mask[mini]
    logp = torch.zeros(ids.shape)
    for i, n in enumerate(batch.attention_mask[mini].sum(1).tolist()):
        lp = (model(ids[i:i + 1, :n]).logits[0, :-1] / cfg.temperature).log_softmax(-1)  # (n-1, V)
        logp = logp.index_put((torch.tensor(i), torch.arange(1, n)), lp.gather(-1, ids[i, 1:n, None])[:, 0])
    loss, _ = policy_loss(logp, logp.detach(), batch.advantages[mini], resp, cfg.clip_low, cfg.clip_high, cfg.clip_c,
                               cfg.loss_agg, n_seqs=len(mini), max_len=cfg.max_new_tokens)
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # as the update
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.item()


@pytest.mark.parametrize("share,tokens", [((), 30), ((), 1 << 15), (("cpu",), 30), (("cpu",), 1 << 15)],
                         ids=["gpu-path-budget", "gpu-path-one-forward", "shared-prompts-budget", "shared-prompts-one"])
def test_budget_micro_batches_give_the_per_row_hf_gradient(share, tokens, monkeypatch):
    """The update's micro-batches sized by a token budget (30 tokens: 1-3 rows each; or the whole mini-batch in one
    forward), with prompts shared per group (the CPU path) or one plain forward (the GPU path), give the gradient and
    loss of each row run alone through Hugging Face's forward, to float rounding."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", share)
    model = tiny_model("qwen3")
    batch = fixed_batch(model)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=2, micro_batch=256, micro_tokens=tokens, max_new_tokens=6,
                          precision="float32", temperature=0.8)
    sizes = [len(range(8)[j]) * ids.shape[1] for j, ids, *_ in policy.micro_slices(batch, range(8), 256, tokens)]
    assert (max(sizes) <= tokens and len(sizes) > 2) if tokens == 30 else len(sizes) == 1
    (got,), stats, _ = update_grads(model, batch, cfg)
    want, loss = hf_update_grads(tiny_model("qwen3"), batch, cfg, list(range(8)))
    assert stats["pg_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4)


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's values back to the host: .item(), int(), float(), bool() (aten's
    _local_scalar_dense, which waits for the device on a GPU) and .tolist()."""
    def __init__(self, monkeypatch):
        super().__init__()
        self.n, tolist = 0, torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: setattr(self, "n", self.n + 1) or tolist(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_one_host_sync_per_mini_batch(precision, monkeypatch):
    """On the GPU path (no prompt sharing), an update of 2 mini-batches of several micro-batches reads values back to
    the host twice: once per mini-batch (its statistics and gradient norm, which decide the step); the old-log-prob
    pass not at all. The batch's lengths are on the host, as rollout_step builds it."""
    monkeypatch.setattr(policy, "SHARE_PROMPTS", ())
    model = tiny_model("qwen3")
    b = fixed_batch(model)
    lengths = (b.attention_mask.sum(1).tolist(), b.response_mask.sum(1).tolist())
    batch = Batch(b.input_ids, b.attention_mask, b.response_mask, b.advantages, lengths)
    cfg = grpo.GRPOConfig(group_size=4, mini_batch_prompts=1, micro_tokens=30, max_new_tokens=6, precision=precision,
                          kl_coef=0.1)
    runner, opt = Wrapped(model), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with HostReads(monkeypatch) as reads:
        old, _ = update.policy_logprobs(output_policy, runner, batch, cfg, rows=range(4, 8))
    assert reads.n == 0
    with HostReads(monkeypatch) as reads:
        stats, _ = update.ppo_update(runner, opt, output_policy, batch, old, old, cfg)
    assert reads.n == 2 and stats["updates"] == 2 and len(list(policy.micro_slices(batch, range(4), 256, 30))) > 1
