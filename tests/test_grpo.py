"""grpo.py: the loop, its Trainer, resume, run-dir safety and NaN handling on tiny models; one step on the real default
model. The update's own tests: test_update.py."""
import copy
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

import checkpoints
import decode
import distributed
import evaluate
import grpo
import update
from cli import Diverged, InputError, Stopped
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model
from distributed import Wrapped
from policy import output_policy
from rollout import generate

strip = lambda hist: [{k: v for k, v in m.items() if not k.startswith("time")} for m in hist]


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
