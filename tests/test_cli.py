"""cli.py and every entry script: one-line errors with exit status 2, settings checked before work,
run dirs never mixed."""
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli import InputError, claim_run_dir, parse_config, read_jsonl, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bad_inputs(tmp):
    """(script, args, what the one line must say): the user's own mistakes, each through the real command line."""
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]]}), f"{tmp}/no_answers.parquet")
    pq.write_table(pa.table({"prompt": [], "reward_model": []}), f"{tmp}/empty.parquet")
    open(f"{tmp}/table.csv", "w").write("question,answer\n1+1,2\n")
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]],
                             "reward_model": [{"ground_truth": ""}]}), f"{tmp}/blank.parquet")
    os.makedirs(f"{tmp}/empty_run")
    open(f"{tmp}/a_file", "w").close()
    tiny = ["--steps", "1", "--eval-every", "0", "--out", f"{tmp}/run"]
    return [  # the first case of each script must fail before any import-time work it could skip
        ("decompose.py", ["--model", "./no-such-model-dir"], "does not exist"),
        ("rollout.py", ["--model", "/nonexistent"], "does not exist"),
        ("evaluate.py", ["--model", "./no-such-model-dir", "--out", f"{tmp}/ev"], "does not exist"),
        ("entropy.py", ["--model", "/nonexistent"], "does not exist"),
        ("grpo.py", ["--model", "/nonexistent"] + tiny, "does not exist"),
        ("experiment.py", ["--model", "./no-such-model-dir"], "does not exist"),
        ("entropy.py", ["--data", "no-such-benchmark"], "no data set 'no-such-benchmark'"),
        ("evaluate.py", ["--data", f"{tmp}/no_answers.parquet", "--out", f"{tmp}/ev2"], "has neither verl's columns"),
        ("evaluate.py", ["--k", "0", "--out", f"{tmp}/ev3"], "--k must be >= 1"),
        ("evaluate.py", ["--data", "aime24", "--k", "aime2024=32", "--out", f"{tmp}/ev3b"],
         "--k must name sets of --data"),
        ("evaluate.py", ["--limit", "0", "--out", f"{tmp}/ev4"], "--limit must be >= 1"),
        ("grpo.py", ["--task", f"{tmp}/table.csv"] + tiny,
         "nor plain problem and answer columns; it has question, answer"),
        ("grpo.py", ["--task", f"{tmp}/empty.parquet"] + tiny, "holds no rows"),
        ("grpo.py", ["--task", f"{tmp}/blank.parquet"] + tiny, "every gold answer"),
        ("grpo.py", ["--mini-batch-prompts", "3"] + tiny, "not a multiple of --mini-batch-prompts"),
        ("grpo.py", ["--micro-batch", "0"] + tiny, "--micro-batch must be >= 1"),
        ("grpo.py", ["--group-size", "0"] + tiny, "--group-size must be >= 1"),
        ("grpo.py", ["--steps", "0", "--out", f"{tmp}/run"], "--steps must be >= 1"),
        ("grpo.py", ["--clip-low", "2"] + tiny, "--clip-low must lie in"),
        ("grpo.py", ["--resume", "--out", f"{tmp}/empty_run"], "no checkpoint"),
        ("grpo.py", ["--out", f"{tmp}/a_file/run", "--steps", "1"], "cannot write to the output dir"),
        ("experiment.py", ["--layer", "999"], "k=999 out of range: use 0..28"),
        ("experiment.py", ["--layer", "-1"], "k=-1 out of range"),
        ("experiment.py", ["--sweep", "layer=4,40"], "k=40 out of range"),
        ("experiment.py", ["--seeds", "0"], "--seeds must be"),
        ("bench.py", ["rollout", "--random-weights", "nope"], "no shipped config 'nope'"),
        ("bench.py", ["rollout", "--bandwidth", "-1"], "--bandwidth must be a finite GB/s"),
        ("bench.py", ["rollout", "--batches", "0"], "--batches must be >= 1"),
        ("bench.py", ["rollout", "--dtype", "float16"], "--dtype must be bfloat16 or float32"),
        ("entropy.py", ["--max-new-tokens", "8192", "--out", f"{tmp}/ent"], "--max-new-tokens 8192 leaves no room"),
        ("evaluate.py", ["--max-new-tokens", "9000", "--out", f"{tmp}/ev5"], "--max-new-tokens 9000 leaves no room"),
        ("evaluate.py", ["--temperature", "inf", "--out", f"{tmp}/ev6"], "--temperature must be a finite number"),
        ("grpo.py", ["--lr", "inf"] + tiny, "--lr must be a finite number"),
        ("grpo.py", ["--kl-coef", "nan"] + tiny, "--kl-coef must be a finite number"),
        ("grpo.py", ["--weight-decay", "-1"] + tiny, "--weight-decay"),
        ("grpo.py", ["--max-nonfinite", "0"] + tiny, "--max-nonfinite"),
        ("experiment.py", ["--inter-steps", "20", "--steps", "10"], "--inter-steps must lie in 0..--steps"),
        ("experiment.py", ["--sweep", "inter_steps=1,1"], "lists a value twice"),
        ("experiment.py", ["--methods", "grpo,dpo"], "--methods must be a comma list"),
        ("experiment.py", ["--eval-every", "0"], "--eval-every must be >= 1"),
        ("bench.py", ["rollout", "--attention", "flash"], "--attention must be sdpa or eager"),
        ("grpo.py", ["--attention", "flash"] + tiny, "--attention must be sdpa or eager"),
        ("experiment.py", ["--attention", "flash"], "--attention must be sdpa or eager"),
        ("evaluate.py", ["--attention", "flash", "--out", f"{tmp}/ev7"], "--attention must be sdpa or eager"),
        ("entropy.py", ["--attention", "flash", "--out", f"{tmp}/ent2"], "--attention must be sdpa or eager"),
        ("bench.py", ["nope"], "name a benchmark first"),
        ("rollout.py", ["--bench"], "moved: python bench.py rollout"),
        ("grpo.py", ["--bench"], "moved: python bench.py grpo"),
        ("bupo.py", ["--bench"], "moved: python bench.py bupo"),
        ("bupo.py", ["--layer", "999"], "k=999 out of range: use 0..28"),
        ("experiment.py", ["--layer", "x"], "--layer must be an integer or auto, got 'x'"),
        ("bupo.py", ["--layer", "4.5"], "--layer must be an integer or auto, got '4.5'"),
        ("bupo.py", ["--methods", "grpo"], "--methods must be one of bupo, bupo_ln, grpo_frozen, grpo_layer_lr"),
    ]


def assert_one_line_error(status, err, want, what):
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("Loading weights", "converting"))]
    assert status == 2, (what, status, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (what, err[-2000:])
    assert want in lines[0], (what, lines[0])


def test_each_script_turns_bad_input_into_one_line(tmp_path):
    """Through the interpreter, one case per script (they start together: each pays for importing torch)."""
    cases = {script: (args, want) for script, args, want in bad_inputs(tmp_path)}  # the first case of each script
    procs = {s: subprocess.Popen([sys.executable, s] + a, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
             for s, (a, _) in cases.items()}
    for script, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert_one_line_error(p.returncode, err, cases[script][1], script)


@pytest.mark.parametrize("i", range(52))
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, i):
    """Every case through its script's main and cli.run_main, as `python SCRIPT ARGS` runs them."""
    script, args, want = bad_inputs(tmp_path)[i]
    main = importlib.import_module(script[:-3]).main
    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    assert_one_line_error(e.value.code, capsys.readouterr().err, want, (script, args))


def test_unexpected_errors_keep_their_traceback(tmp_path):
    code = "import cli\ndef main(argv): raise RuntimeError('a bug')\ncli.run_main(main)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr and "a bug" in p.stderr


def test_a_run_dir_is_writable_locked_and_never_mixed(tmp_path):
    out = str(tmp_path / "run")
    with claim_run_dir(out, {"lr": 1.0, "steps": 2}):
        open(os.path.join(out, "metrics.jsonl"), "w").write("{}\n")
    with pytest.raises(InputError, match="holds a run already"):
        with claim_run_dir(out, {"lr": 1.0, "steps": 2}):
            pass
    with pytest.raises(InputError, match=r"other settings: lr \(1.0 there, 2.0 now\)"):
        with claim_run_dir(out, {"lr": 2.0, "steps": 2}, resume=True):
            pass
    with claim_run_dir(out, {"lr": 1.0, "steps": 5}, resume=True, mutable=("steps",)):
        assert os.path.exists(os.path.join(out, "metrics.jsonl"))  # resumed: kept
    with claim_run_dir(out, {"lr": 3.0}, overwrite=True):
        assert sorted(os.listdir(out)) == [".lock", "config.json"]  # overwritten: emptied first
    with pytest.raises(InputError, match="cannot write"):
        with claim_run_dir(str(tmp_path / "run" / "config.json" / "sub"), {}):
            pass


def test_a_second_process_on_the_same_dir_stops_at_once(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"import cli, time\nwith cli.claim_run_dir({out!r}, {{}}):\n"
                                                     "    print('in', flush=True)\n    time.sleep(30)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "in"
        t = time.perf_counter()
        with pytest.raises(InputError, match=f"another process \\(pid {holder.pid}\\) is writing"):
            with claim_run_dir(out, {}, resume=True):
                pass
        assert time.perf_counter() - t < 1
    finally:
        holder.kill()
        holder.wait()
    with claim_run_dir(out, {}, resume=True):  # the lock went with the process
        pass


@dataclass
class Cfg:
    lr: float = 1.0  # learning rate
    steps: int = 3   # steps
    out: str = "x"   # output dir
    resume: bool = False  # continue


def test_parse_config_resumes_with_the_saved_settings(tmp_path):
    presets = {"cpu": {"lr": 0.5}, "paper": {}}
    assert parse_config(Cfg, presets, argv=[]) == Cfg(lr=0.5)
    assert parse_config(Cfg, presets, argv=["--preset", "paper", "--steps", "4"]) == Cfg(steps=4)
    json.dump({"lr": 0.25, "steps": 9, "out": str(tmp_path), "resume": False}, open(tmp_path / "config.json", "w"))
    assert (parse_config(Cfg, presets, argv=["--resume", "--out", str(tmp_path), "--steps", "12"])
            == Cfg(0.25, 12, str(tmp_path), True))


@dataclass
class LayerCfg:
    layer: int | None = None  # k, or auto
    out: str = "x"            # output dir
    resume: bool = False      # continue


def test_an_int_or_none_setting_is_parsed_once(tmp_path):
    """--layer auto / 4 become None / 4 at the command line (a preset's int stays), saved in config.json as null / 4;
    anything else is an InputError naming the flag. Resuming, a saved "4" (an older run's) parses to 4 too."""
    presets = {"cpu": {"layer": 4}}
    assert parse_config(LayerCfg, presets, argv=[]).layer == 4
    assert parse_config(LayerCfg, presets, argv=["--layer", "auto"]).layer is None
    assert parse_config(LayerCfg, presets, argv=["--layer", "7"]).layer == 7
    for bad in ("x", "4.0", "", "4_0", "+4", " 4"):
        with pytest.raises(InputError, match=re.escape(f"--layer must be an integer or auto, got '{bad}'")):
            parse_config(LayerCfg, presets, argv=["--layer", bad])
    cfg = parse_config(LayerCfg, presets, argv=["--layer", "auto", "--out", str(tmp_path)])
    with claim_run_dir(str(tmp_path), cfg):
        pass
    assert json.load(open(tmp_path / "config.json"))["layer"] is None
    json.dump({"layer": "4", "out": str(tmp_path), "resume": False}, open(tmp_path / "config.json", "w"))
    assert parse_config(LayerCfg, presets, argv=["--resume", "--out", str(tmp_path)]).layer == 4


@dataclass
class WrappedHelpCfg:
    layer: int = 4  # the layer k of pi_k,
                    # from the entropy analysis
    # not help: a comment of its own
    out: str = "x"  # output dir


def test_a_flags_help_is_its_comment_with_the_comment_lines_below_it(capsys):
    """A field's --help is the comment beside it plus the comment-only lines right below it, indented past the field
    (config.py wraps its long ones so); a comment line at the field's own indent is nobody's help."""
    with pytest.raises(SystemExit):
        parse_config(WrappedHelpCfg, {"cpu": {}}, argv=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the layer k of pi_k, from the entropy analysis (preset cpu: 4)" in text
    assert "output dir (preset cpu: x)" in text and "not help" not in text


def test_read_jsonl_drops_a_cut_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"st')
    assert read_jsonl(str(path)) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(InputError, match="m.jsonl, line 2"):
        read_jsonl(str(path))
    assert read_jsonl(str(tmp_path / "none.jsonl")) == []
