"""experiment.py: the multi-seed experiment on tiny models: paired seeds, intervals, resume, sweeps, every method."""
import json
import os
import signal
from dataclasses import replace

import pytest

import bupo
import checkpoints
import experiment
import update
from bupo import PHASE_ONE
from cli import InputError
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model
from experiment import METHODS


def tiny_experiment(tmp_path, monkeypatch, **kw):
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(experiment, "model_config", lambda *a: tiny_model("llama").config)
    return tiny_cfg(tmp_path, bupo.BuPOConfig, **{**dict(steps=2, eval_every=1, inter_steps=1, layer=1,
                                                         profile_samples=2, seeds="2", out=str(tmp_path / "exp")),
                                                  **kw})


def test_experiment_pairs_seeds_and_reports_intervals(tmp_path, monkeypatch):
    """Both methods on 2 paired seeds: per-seed results, the paired difference and its interval, the figures."""
    cfg = tiny_experiment(tmp_path, monkeypatch)
    experiment.experiment(cfg)
    out = tmp_path / "exp"
    for f in ("comparison.png", "profiles.png", "results.md", "results.json", "initial.json",
              "seed0/bupo/metrics.jsonl", "seed1/grpo/metrics.jsonl"):
        assert (out / f).exists(), f
    assert json.load(open(out / "initial.json"))["k"] == 1  # the shared start's layer k
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
    # no 1.6 GB leftovers
    assert not any((out / f"seed{s}" / r / "checkpoint").exists() for s in (0, 1) for r in ("bupo", "grpo"))


def test_experiment_resume_skips_finished_seeds(tmp_path, monkeypatch):
    cfg = tiny_experiment(tmp_path, monkeypatch, seeds="2")
    real = experiment.train_bupo
    calls = []

    def stop_in_seed_1(run_cfg, *a, **k):
        calls.append(run_cfg.out)
        if run_cfg.seed == 1:
            raise KeyboardInterrupt  # killed during seed 1
        return real(run_cfg, *a, **k)
    monkeypatch.setattr(experiment, "train_bupo", stop_in_seed_1)
    with pytest.raises(KeyboardInterrupt):
        experiment.experiment(cfg)
    assert len(calls) == 3  # seed 0: GRPO, BuPO; then seed 1's first run
    with pytest.raises(InputError, match="holds a run already"):
        experiment.experiment(cfg)  # not without --resume
    calls.clear()
    monkeypatch.setattr(experiment, "train_bupo",
                        lambda run_cfg, *a, **k: (calls.append(run_cfg.out), real(run_cfg, *a, **k))[1])
    experiment.experiment(replace(cfg, resume=True))
    # seed 0 is not trained again
    assert sorted(calls) == sorted(str(tmp_path / "exp" / "seed1" / r) for r in ("grpo", "bupo"))
    assert set(json.load(open(tmp_path / "exp" / "results.json"))["per_seed"]["BuPO"]) == {"0", "1"}


def test_sweep_and_methods(tmp_path, monkeypatch):
    cfg = tiny_experiment(tmp_path, monkeypatch, seeds="0,", sweep="inter_steps=0,1", methods="bupo")
    experiment.experiment(cfg)
    res = json.load(open(tmp_path / "exp" / "results.json"))
    assert set(res["per_seed"]) == {"BuPO inter_steps=0", "BuPO inter_steps=1"} and res["paired"] == {}
    assert (tmp_path / "exp" / "sweep.png").exists()
    for bad, match in [(dict(sweep="depth=1"), "--sweep must be"), (dict(sweep="layer=1,9"), "out of range"),
                       (dict(methods="dpo"), "--methods"), (dict(methods="grpo,grpo"), "--methods"),
                       (dict(seeds="0"), "--seeds")]:
        with pytest.raises(InputError, match=match):
            experiment.experiment(replace(cfg, out=str(tmp_path / "bad"), **bad))


def test_every_method_of_the_paper_in_one_experiment(tmp_path, monkeypatch):
    """Table 1's methods and the ablations (Tables 5, 11) on 2 paired seeds, with the sampled metric: Avg@K per seed
    and its interval, each method's paired difference from GRPO, the Pass@K curve (pass@1 = Avg@K exactly)."""
    cfg = tiny_experiment(tmp_path, monkeypatch, methods=",".join(METHODS), eval_samples=4, eval_samples_limit=2)
    experiment.experiment(cfg)
    out = tmp_path / "exp"
    res = json.load(open(out / "results.json"))
    names = {name for name, _ in METHODS.values()}
    assert set(res["per_seed"]) == names and set(res["paired"]) == names - {"GRPO"}
    assert set(res["pass_at_k"]) == names | {"initial"} and list(res["pass_at_k"]["PPO"]) == ["1", "2", "4"]
    for method, (name, est) in METHODS.items():
        hist = [json.loads(x) for x in open(out / "seed1" / method / "metrics.jsonl")]
        assert res["sampled"]["per_seed"][name]["1"] == hist[-1]["sampled/avg/avg@4"] == hist[-1]["sampled/avg/pass@1"]
        assert ("critic_loss" in hist[0]) == (est == "gae")
        assert [m["phase"] for m in hist] == (["internal", "full"] if method in PHASE_ONE else ["full", "full"])
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
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in [("steps", 2), ("eval_every", 1), ("inter_steps", 1),
            ("layer", "1"), ("profile_samples", 2), ("seeds", "0,"), ("task", "arithmetic"),
            ("eval_data", "arithmetic"), ("eval_limit", 4), ("eval_max_new_tokens", 4), ("prompts_per_step", 4),
            ("group_size", 4), ("mini_batch_prompts", 2), ("micro_batch", 5), ("max_new_tokens", 6),
            ("precision", "float32"), ("lr", 0.01), ("eval_samples", 0), ("out", cfg.out)]]
    real, calls = bupo.readout_entropies, []

    def kill_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)
    monkeypatch.setattr(bupo, "readout_entropies", kill_once)
    with pytest.raises(SystemExit) as stop:
        cli.run_main(experiment.main, argv)
    assert stop.value.code == 130
    out = tmp_path / "exp"
    assert not (out / "results.md").exists() and (out / "seed0" / "grpo" / "checkpoint" / "trainer.pt").exists()
    assert len((out / "seed0" / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as refused:
        cli.run_main(experiment.main, argv + ["--resume", "--steps=3"])  # a finished run would not have step 3
    assert refused.value.code == 2
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    cli.run_main(experiment.main, argv + ["--resume"])
    grpo0 = [json.loads(x) for x in open(out / "seed0" / "grpo" / "metrics.jsonl")]
    assert [m["step"] for m in grpo0] == [0, 1] and (out / "results.md").exists()
    assert not (out / "seed0" / "grpo" / "checkpoint").exists()
