"""Run control (docs/runs.md): a stop request always stops, every resume finishes or is refused by name, run files that
were edited or damaged are refused by name, bad values are one line before the out dir exists; and every piece of
advice printed is followed here, through the command line, to a run that works.

Each test is one defect of issue 32, reproduced first against the code before it (all failed there).
"""
import json
import os
import random
import re
import shlex
import signal

import pytest
import torch

import bupo
import experiment
import checkpoints
import cli
import evaluate
import grpo
import update
from conftest import FakeTok, fake_load, text_reward, tiny_model
from policy import output_policy
from test_evaluate import tiny_checkpoint

GRPO_ARGS = ["--eval-every=0", "--eval-samples=0", "--prompts-per-step=4", "--group-size=4", "--mini-batch-prompts=2",
             "--micro-batch=5", "--max-new-tokens=6", "--precision=float32", "--rollout-dtype="]


@pytest.fixture
def tiny_grpo(monkeypatch):
    """grpo.py on the tiny llama and its FakeTok, rewarded by the text alone."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(grpo, "model_config", lambda *a: tiny_model("llama").config)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)


def run(main, argv, capsys, code):
    """cli.run_main(main, argv) as `python SCRIPT ARGV` runs it: its exit status must be `code`; returns the
    last line of stderr, which must be one line of the kind that status prints, no traceback."""
    if code == 0:
        cli.run_main(main, argv)
        return None
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress bars
    assert e.value.code == code and "Traceback" not in err, err[-2000:]
    assert last.startswith("stopped: " if code == 130 else "error: "), err[-2000:]
    return last


def steps_logged(out):
    return [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]


def tiny_experiment(tmp_path, monkeypatch, methods, steps=2, seeds="0,"):
    """(out dir, argv) of an experiment.py run of `methods` (2 steps, seed 0 by default) on a tiny Llama with the
    text reward."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(experiment, "model_config", lambda *a: tiny_model("llama").config)
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    out = tmp_path / "exp"
    argv = GRPO_ARGS + [f"--steps={steps}", "--eval-every=1", "--inter-steps=1", "--layer=1", "--profile-samples=2",
                        f"--seeds={seeds}", f"--methods={methods}", "--task=arithmetic", "--eval-data=arithmetic",
                        "--eval-limit=4", "--eval-max-new-tokens=4", "--lr=0.01", f"--out={out}"]
    return out, argv


# ----------------------------------------------------------------------------- 1. a stop in a run's last step

def test_1_a_stop_in_the_last_step_of_a_run_stops_the_experiment_before_its_next_run(tmp_path, monkeypatch, capsys):
    """SIGTERM while GRPO (the first of two runs) runs its last step: exit 130 before BuPO starts, no report; the
    advised --resume skips the finished GRPO run (its checkpoint deleted), trains BuPO and reports."""
    out, argv = tiny_experiment(tmp_path, monkeypatch, "grpo,bupo")
    real, calls = bupo.readout_entropies, []

    def term_in_grpo_step_1(*a, **kw):  # called once a step: the 2nd call is GRPO's step 1, its last
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(bupo, "readout_entropies", term_in_grpo_step_1)
    last = run(experiment.main, argv, capsys, 130)
    assert len(calls) == 2 and "GRPO, seed 0 after step 1 of 2, checkpoint saved" in last
    assert not (out / "seed0" / "bupo").exists() and not (out / "results.md").exists()
    assert steps_logged(out / "seed0" / "grpo") == [0, 1]
    advice = re.search(r"continue the experiment with (--resume --out \S+)$", last).group(1)
    run(experiment.main, shlex.split(advice), capsys, 0)
    assert len(calls) == 4  # BuPO's two steps only: the finished GRPO run is not trained again
    assert steps_logged(out / "seed0" / "bupo") == [0, 1] and (out / "results.md").exists()
    assert not (out / "seed0" / "grpo" / "checkpoint").exists()


# ----------------------------------------------------------------------------- 2. a log line lost before the checkpoint

def test_2_a_log_line_lost_before_the_checkpoint_is_refused_by_name_and_its_advice_works(tmp_path, tiny_grpo, capsys):
    """A finished 3-step run whose last metrics line was cut: `--resume --steps 4` used to train step 3 and log 0, 1, 3,
    then stop with 130 at every later resume. Now the missing step is named, and its advice (move the dir aside,
    rerun) finishes. Obeying "fix or delete that line" for a corrupt middle line leads to the same refusal."""
    out = tmp_path / "run"
    argv = GRPO_ARGS + ["--steps=3", "--lr=0.01", f"--out={out}"]
    run(grpo.main, argv, capsys, 0)
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # cut mid-record
    last = run(grpo.main, argv + ["--resume", "--steps=4"], capsys, 2)
    assert "metrics.jsonl lacks the record of step(s) 2, which its checkpoint (after step 2) has trained" in last
    assert re.search(r"move (\S+) aside .* and rerun without --resume", last).group(1) == str(out)
    os.rename(out, tmp_path / "run.aside")
    run(grpo.main, argv + ["--steps=4"], capsys, 0)
    assert steps_logged(out) == [0, 1, 2, 3]

    log.write_text("\n".join(lines[:1] + ["not json"] + lines[2:]) + "\n")  # a corrupt middle line ...
    assert "line 2, is not valid JSON" in run(grpo.main, argv + ["--resume", "--steps=5"], capsys, 2)
    log.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # ... deleted, as that message says
    last = run(grpo.main, argv + ["--resume", "--steps=5"], capsys, 2)
    assert "lacks the record of step(s) 1," in last and "rerun with --overwrite" in last
    run(grpo.main, argv + ["--steps=5", "--overwrite"], capsys, 0)
    assert steps_logged(out) == [0, 1, 2, 3, 4]


def test_2_each_metrics_line_is_on_the_disk_before_a_checkpoint_of_a_later_step(tmp_path, tiny_grpo, monkeypatch,
                                                                                 capsys):
    """metrics.jsonl is fsynced after each step's line, before the checkpoint (itself fsynced) that follows it: a power
    loss cannot leave a checkpoint ahead of the log."""
    events, real_fsync, real_save = [], os.fsync, checkpoints.save_checkpoint

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith("metrics.jsonl"):  # how many whole lines it holds when it reaches the disk
            events.append(("fsync", "metrics.jsonl", len(open(path).readlines())))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(grpo, "save_checkpoint", lambda *a, **k: (events.append(("save", a[4])), real_save(*a, **k))[1])
    run(grpo.main, GRPO_ARGS + ["--steps=3", "--save-every=1", "--lr=0.01", f"--out={tmp_path / 'run'}"], capsys, 0)
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert [events[i][1] for i in saves] == [1, 2, 3]
    # the log holds the step's line
    assert all(events[i - 1] == ("fsync", "metrics.jsonl", events[i][1]) for i in saves)


# ----------------------------------------------------------------------------- 3. the non-finite stop and its recovery

def nan_from(first_bad_step, above_lr):
    """grpo.train_step whose losses are NaN from first_bad_step on while the lr is above above_lr (a diverging run)."""
    real = grpo.train_step

    def policy(model, ids, att, temperature, mask=None, **kw):
        logp, ent = output_policy(model, ids, att, temperature, mask)
        return logp * float("nan"), ent

    def train_step(trainer, problems, cfg, s, pol, d):
        bad = s >= first_bad_step and cfg.lr > above_lr
        return real(trainer, problems, cfg, s, policy if bad else pol, d)
    return train_step


def test_3_a_non_finite_stop_is_one_line_and_its_advised_recovery_works(tmp_path, tiny_grpo, monkeypatch, capsys):
    """Steps 3 and 4 diverge (--max-nonfinite 2): exit 1, one line, nothing saved over the checkpoint after step 1;
    `--resume --out X --lr <lower>` exactly as advised finishes from it, the lower lr applied (the optimizer's) and
    recorded (config.json, trainer.pt and each step's metrics); a higher lr is refused."""
    monkeypatch.setattr(grpo, "train_step", nan_from(3, above_lr=5e-3))
    out = tmp_path / "run"
    argv = GRPO_ARGS + ["--steps=6", "--save-every=2", "--max-nonfinite=2", "--lr=0.01", f"--out={out}"]
    last = run(grpo.main, argv, capsys, 1)
    assert "steps 3..4 had only non-finite losses or gradients" in last and "checkpoint after step 1" in last
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2  # not the diverged weights
    assert "other settings: lr" in run(grpo.main, ["--resume", f"--out={out}", "--lr=0.02"], capsys, 2)
    advice = re.search(r"(--resume --out \S+ --lr \S+)$", last).group(1)
    assert advice == f"--resume --out {out} --lr 0.001"
    run(grpo.main, shlex.split(advice), capsys, 0)
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == list(range(6)) and [m["lr"] for m in lines] == [0.01] * 2 + [0.001] * 4
    assert all(m["skipped_updates"] == 0 for m in lines)
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["config"]["lr"] == json.load(open(out / "config.json"))["lr"] == 0.001
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.001]
    assert not (out / "nonfinite.json").exists()  # a later resume compares lr as any setting
    assert "other settings: lr" in run(grpo.main, ["--resume", f"--out={out}", "--steps=7", "--lr=0.0001"], capsys, 2)


def test_3_a_non_finite_stop_without_an_earlier_checkpoint_advises_starting_afresh(tmp_path, tiny_grpo, monkeypatch,
                                                                                     capsys):
    """No checkpoint from before the first bad step (the default: none until the end): the advice is a fresh run with a
    lower lr, which, followed as printed, finishes."""
    monkeypatch.setattr(grpo, "train_step", nan_from(1, above_lr=5e-3))
    out = tmp_path / "run"
    argv = GRPO_ARGS + ["--steps=4", "--lr=0.01", f"--out={out}"]
    last = run(grpo.main, argv, capsys, 1)
    assert "steps 1..3 had only non-finite" in last and not (out / "checkpoint").exists()
    advice = re.search(r"rerunning with (--overwrite --lr \S+)$", last).group(1)
    run(grpo.main, argv + shlex.split(advice), capsys, 0)
    assert [json.loads(x)["lr"] for x in open(out / "metrics.jsonl")] == [0.001] * 4


# ----------------------------------------------------------------------------- 4. a hand-edited config.json

def test_4_a_hand_edited_config_is_refused_by_name(tmp_path, tiny_grpo, capsys):
    """config.json's lr changed by hand used to train the next steps with it: now refused against the checkpoint's
    settings, naming the field; putting the value back, as advised, resumes."""
    out = tmp_path / "run"
    run(grpo.main, GRPO_ARGS + ["--steps=2", "--lr=0.01", f"--out={out}"], capsys, 0)
    cfg = json.load(open(out / "config.json"))
    json.dump({**cfg, "lr": 0.02, "clip_high": 0.3}, open(out / "config.json", "w"))
    last = run(grpo.main, ["--resume", f"--out={out}", "--steps=3"], capsys, 2)
    assert ("config.json was changed after its checkpoint was saved: clip_high (0.2 in the checkpoint, "
            "0.3 in config.json), lr (0.01 in the checkpoint, 0.02 in config.json)" in last
            and "put the checkpoint's value(s) back" in last)
    json.dump({**json.load(open(out / "config.json")), "lr": 0.01, "clip_high": 0.2}, open(out / "config.json", "w"))
    run(grpo.main, ["--resume", f"--out={out}", "--steps=3"], capsys, 0)
    assert [json.loads(x)["lr"] for x in open(out / "metrics.jsonl")] == [0.01] * 3


# ----------------------------------------------------------------------------- 5, 6. evaluate.py's key

def test_5_an_evaluation_resumes_under_another_spelling_of_its_model(tmp_path, capsys):
    """DIR, DIR/ and a symlink to DIR are one model (the key is the weights); so are --model smollm2 and no --model."""
    model = tiny_checkpoint(tmp_path / "m")
    os.symlink(model, tmp_path / "link")
    out = tmp_path / "ev"
    args = ["--data", "arithmetic", "--limit", "3", "--k", "2", "--max-new-tokens", "3", "--out", str(out)]
    run(evaluate.main, ["--model", model] + args, capsys, 0)
    path = out / "responses.jsonl"
    lines = path.read_text().splitlines()
    for spelling in (model + "/", str(tmp_path / "link")):
        path.write_text("\n".join(lines[:-1]) + "\n")  # the last record lost: resumed under the other spelling
        run(evaluate.main, ["--model", spelling] + args, capsys, 0)
        assert path.read_text().splitlines() == lines
    default = ["--data", "arithmetic", "--limit", "1", "--k", "1", "--max-new-tokens", "1",
               "--out", str(tmp_path / "ev2")]
    run(evaluate.main, ["--model", "smollm2"] + default, capsys, 0)
    run(evaluate.main, default, capsys, 0)  # no --model: the same, resumed (nothing to sample)
    assert len((tmp_path / "ev2" / "responses.jsonl").read_text().splitlines()) == 1


def test_6_a_resumed_evaluation_keeps_its_batch_size_and_samples_what_an_uninterrupted_one_does(tmp_path, capsys):
    """48 samples in batches of 8, the last record cut: resuming with 3 is refused by name (the numerics of a batch
    depend on its shape); resuming with 8, as advised, samples the last window (8 batches of 8: all 48 rows) whole
    again and gives exactly the uninterrupted run's records."""
    model = tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "ev"
    args = ["--model", model, "--data", "arithmetic", "--limit", "6", "--k", "8", "--max-new-tokens", "12",
            "--out", str(out)]
    run(evaluate.main, args + ["--batch-size", "8"], capsys, 0)
    path = out / "responses.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 48
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    last = run(evaluate.main, args + ["--batch-size", "3"], capsys, 2)
    assert "other settings: batch_size (8 there, 3 now)" in last and "Resume with its settings" in last
    run(evaluate.main, args + ["--batch-size", "8"], capsys, 0)
    assert path.read_text().splitlines() == lines


# ----------------------------------------------------------------------------- 7, 8. bad values before the out dir

def test_7_a_model_dir_without_weights_is_one_line_before_the_out_dir_is_claimed(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m")
    os.remove(os.path.join(model, "model.safetensors"))
    for main, argv in ((grpo.main, GRPO_ARGS + ["--steps=1"]), (evaluate.main, []), (experiment.main, [])):
        out = tmp_path / main.__module__
        last = run(main, argv + ["--model", model, "--out", str(out)], capsys, 2)
        assert "has a config.json but no weights" in last and not out.exists(), main.__module__


@pytest.mark.parametrize("script,argv,want", [
    ("grpo", ["--seed", "99999999999999999999999"], "--seed must lie in 0..4294967295, got 99999999999999999999999"),
    ("grpo", ["--seed", "-1"], "--seed must lie in 0..4294967295"),
    ("evaluate", ["--seed", "99999999999999999999999"], "--seed must lie in 0..4294967295"),
    ("experiment", ["--seeds", "3,99999999999999999999999"], "--seeds must lie in 0..4294967295"),
    ("experiment", ["--seed", "4294967295", "--seeds", "2"],
     "--seed + --seeds - 1 must lie in 0..4294967295, got 4294967296"),
])
def test_8_a_seed_out_of_range_is_one_line_before_the_out_dir_is_claimed(tmp_path, monkeypatch, capsys, script,
                                                                            argv, want):
    for module in (grpo, experiment):
        monkeypatch.setattr(module, "model_config", lambda *a: tiny_model("llama").config)
    main = {"grpo": grpo.main, "evaluate": evaluate.main, "experiment": experiment.main}[script]
    assert want in run(main, argv + ["--out", str(tmp_path / "out")], capsys, 2)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 9. a trainer.pt of random bytes

@pytest.mark.parametrize("content", ["random", "another object", "truncated"])
def test_9_an_unreadable_trainer_state_is_damaged_in_one_line_and_its_advice_works(tmp_path, tiny_grpo, capsys,
                                                                                   content):
    out = tmp_path / "run"
    argv = GRPO_ARGS + ["--steps=2", "--lr=0.01", f"--out={out}"]
    run(grpo.main, argv, capsys, 0)
    trainer = out / "checkpoint" / "trainer.pt"
    if content == "random":
        trainer.write_bytes(random.Random(0).randbytes(4096))
    elif content == "another object":
        torch.save([1, 2, 3], trainer)
    else:
        trainer.write_bytes(trainer.read_bytes()[:300])
    last = run(grpo.main, argv + ["--resume", "--steps=3"], capsys, 2)
    assert f"{trainer} is damaged" in last and "nothing is lost" in last
    os.rename(out, tmp_path / "aside")  # as advised: move it aside and rerun without --resume
    run(grpo.main, argv + ["--steps=3"], capsys, 0)
    assert steps_logged(out) == [0, 1, 2]


def test_9_a_damaged_run_of_an_experiment_names_the_experiments_way_on(tmp_path, monkeypatch, capsys):
    """In experiment.py a stopped run's trainer.pt overwritten with random bytes: one line naming the run; moving it
    aside and resuming the experiment, as advised, trains that run again and reports."""
    out, argv = tiny_experiment(tmp_path, monkeypatch, "grpo")
    real = bupo.readout_entropies
    monkeypatch.setattr(bupo, "readout_entropies",
                        lambda *a, **kw: (os.kill(os.getpid(), signal.SIGINT), real(*a, **kw))[1])
    run(experiment.main, argv, capsys, 130)
    monkeypatch.setattr(bupo, "readout_entropies", real)
    run_dir = out / "seed0" / "grpo"
    (run_dir / "checkpoint" / "trainer.pt").write_bytes(random.Random(1).randbytes(1000))
    last = run(experiment.main, argv + ["--resume"], capsys, 2)
    assert "GRPO, seed 0:" in last and "trainer.pt is damaged" in last
    aside, advice = re.search(r"move (\S+) aside .* continue the experiment with (--resume --out \S+): that run",
                              last).groups()
    assert aside == str(run_dir)
    os.rename(aside, str(run_dir) + ".damaged")
    run(experiment.main, shlex.split(advice), capsys, 0)
    assert steps_logged(run_dir) == [0, 1] and (out / "results.md").exists()


def test_4_a_hand_edited_experiment_config_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """experiment.py: the experiment's config.json with another lr used to train the next runs with it beside the
    finished ones (one report, two settings); now the run that disagrees is named, and putting the value back
    resumes."""
    out, argv = tiny_experiment(tmp_path, monkeypatch, "grpo", steps=1, seeds="2")
    real, calls = bupo.readout_entropies, []
    monkeypatch.setattr(bupo, "readout_entropies",
                        lambda *a, **kw: (calls.append(1), len(calls) == 2 and os.kill(os.getpid(), signal.SIGINT),
                                          real(*a, **kw))[2])
    run(experiment.main, argv, capsys, 130)  # seed 0 finished, seed 1 stopped in its (last) step
    cfg = json.load(open(out / "config.json"))
    json.dump({**cfg, "lr": 0.02}, open(out / "config.json", "w"))
    last = run(experiment.main, ["--resume", f"--out={out}"], capsys, 2)
    assert (f"{out}/seed0/grpo/config.json and {out}/config.json disagree: "
            "lr (0.01 in the run, 0.02 in the experiment)" in last)
    json.dump(cfg, open(out / "config.json", "w"))
    run(experiment.main, ["--resume", f"--out={out}"], capsys, 0)
    # seed 1 stopped after its last step: nothing to train again
    assert (out / "results.md").exists() and len(calls) == 2


def test_3_a_non_finite_stop_in_an_experiment_advises_a_fresh_experiment_that_works(tmp_path, monkeypatch, capsys):
    """experiment.py: the runs of an experiment share one lr (they are paired), so a diverged run's advice is the whole
    experiment afresh with a lower lr; followed as printed, it finishes."""
    monkeypatch.setattr(update, "problem_reward", text_reward)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: (tiny_model("llama"), FakeTok()))
    monkeypatch.setattr(experiment, "model_config", lambda *a: tiny_model("llama").config)
    monkeypatch.setattr(grpo, "train_step", nan_from(1, above_lr=5e-3))
    out = tmp_path / "exp"
    argv = GRPO_ARGS + ["--steps=3", "--max-nonfinite=2", "--eval-every=1", "--inter-steps=1", "--layer=1",
                        "--profile-samples=2", "--seeds=0,", "--methods=grpo", "--task=arithmetic",
                        "--eval-data=arithmetic", "--eval-limit=4", "--eval-max-new-tokens=4", "--lr=0.01",
                        f"--out={out}"]
    last = run(experiment.main, argv, capsys, 1)
    assert "GRPO, seed 0: steps 1..2 had only non-finite losses" in last
    advice = re.search(r"start it afresh with a lower --lr \(e.g. (--lr \S+)\) and (--overwrite)", last).groups()
    run(experiment.main, argv + shlex.split(" ".join(advice)), capsys, 0)
    assert (out / "results.md").exists() and steps_logged(out / "seed0" / "grpo") == [0, 1, 2]
