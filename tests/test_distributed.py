"""distributed.py: 2 gloo processes, spawned here as torchrun would start them, against 1 process on the
same global batch."""
import json
import os
import signal
import socket
import sys
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

import bupo
import checkpoints
import models
import distributed
import grpo
import update
from cli import InputError, Stopped
from conftest import FakeTok, fake_load, text_reward, tiny_cfg, tiny_model


def spawn(fn, world, *args):
    """Run fn(rank, *args) in `world` fresh processes with torchrun's environment; re-raises a rank's error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, fn, args), nprocs=world, start_method="spawn")


def _rank_main(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        distributed.close()


def bupo_cfg(out, **kw):
    return tiny_cfg(out, bupo.BuPOConfig, **{**dict(steps=2, prompts_per_step=4, mini_batch_prompts=2, micro_batch=3,
                                                    eval_every=1, lr=1e-3, inter_steps=1, layer=1, profile_every=0,
                                                    profile_samples=2), **kw})


PROBE = torch.tensor([[1, 5, 9, 14, 30, 2]])


def train_and_report(rank, cfg, result, writes_log):
    """BuPO for 2 steps (one on pi_1, one full); rank 0 saves the metrics and weights, rank 1 lists what it wrote."""
    update.problem_reward = text_reward
    if rank:
        out = os.path.abspath(cfg.out)
        writes = []
        sys.addaudithook(lambda event, a: writes.append([event, str(a[0])])
                         if _is_write(event, a) and os.path.abspath(str(a[0])).startswith(out) else None)
    hist, model, _ = bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())
    if rank == 0:
        with torch.no_grad():
            logits = model(PROBE).logits  # the returned model runs (FSDP: rebuilt from the gathered shards)
        torch.save({"hist": hist, "params": model.state_dict(), "logits": logits}, result)
    else:
        assert model is None or not cfg.fsdp  # FSDP: the full copy exists on rank 0 only
        json.dump(writes, open(writes_log, "w"))


def _is_write(event, args):
    if event == "open":
        return isinstance(args[0], (str, os.PathLike)) and any(c in str(args[1] or "r") for c in "wax+")
    return event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


def assert_same_metrics(hist2, hist1, tol=1e-4):
    assert len(hist2) == len(hist1)
    for m2, m1 in zip(hist2, hist1):
        assert set(m2) == set(m1)
        for k, v in m1.items():
            if k.startswith("time") or k in ("entropy_layer1", "entropy_output"):
                continue  # timings; entropies on each rank's first micro-batch (a different sample by design)
            want = v if isinstance(v, str) else pytest.approx(v, rel=tol, abs=tol)
            assert m2[k] == want, (m1["step"], k, m2[k], v)


@pytest.mark.parametrize("fsdp,inter_steps,extra", [
    (False, 1, {}),
    (True, 1, dict(kl_coef=0.05, profile_every=2, activation_checkpointing=True)),
    (False, 0, dict(kl_coef=0.05)),
    (True, 1, dict(loss_agg="seq-mean-token-mean")),
    (False, 0, dict(loss_agg="seq-mean-token-sum-norm"))],
    ids=["ddp-bupo", "fsdp-bupo", "ddp-grpo", "fsdp-shared-prompts-seq-mean", "ddp-dr-grpo"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(tmp_path, fsdp, inter_steps, extra, monkeypatch):
    """Same weights and metrics (rewards, losses, clip fractions, grad norm, held-out accuracy); only rank 0 writes.

    BuPO: a step on pi_1 (early exit, layer 2 unused), then a full step; GRPO: two full steps.
    The first FSDP run also has a KL term to a sharded reference, an internal entropy profile
    (every rank gathers the weights) and recomputes its layers in the backward; the second
    shares each prompt's forward among its group (no recomputation) and averages per
    sequence (seq-mean-token-mean); the last aggregates as Dr. GRPO (seq-mean-token-sum-norm).
    """
    monkeypatch.setattr(update, "problem_reward", text_reward)
    kw = dict(inter_steps=inter_steps, **{k: v for k, v in extra.items() if k != "activation_checkpointing"})
    hist1, model1, _ = bupo.train_bupo(bupo_cfg(tmp_path / "one", **kw), 1, tiny_model("llama"), FakeTok())
    cfg2 = bupo_cfg(tmp_path / "two", fsdp=fsdp, **kw,
                    activation_checkpointing=extra.get("activation_checkpointing", False))
    spawn(train_and_report, 2, cfg2, str(tmp_path / "result.pt"), str(tmp_path / "writes.json"))
    res = torch.load(tmp_path / "result.pt", weights_only=False)
    assert_same_metrics(res["hist"], hist1)
    # two real updates a step, not a zero-advantage batch
    assert hist1[0]["updates"] == 2 and hist1[0]["reward_std"] > 0
    init = tiny_model("llama").state_dict()
    for name, p in model1.state_dict().items():
        # Adam moves a weight by ~lr whatever its gradient's size, so an entry whose gradient is
        # rounding noise can differ by ~lr: compare whole updates, which agree to well below 1%
        step1, step2 = p - init[name], res["params"][name] - init[name]
        assert step1.norm() > 0, name
        assert (step2 - step1).norm() <= 1e-2 * step1.norm(), (name, (step2 - step1).norm().item(), step1.norm().item())
    with torch.no_grad():
        torch.testing.assert_close(res["logits"], model1(PROBE).logits, atol=1e-3, rtol=1e-3)
    assert json.load(open(tmp_path / "writes.json")) == []  # rank 1 wrote nothing under out/
    lines = (tmp_path / "two" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]  # one line per step, not one per rank


def stop_after_first_step(rank, cfg):
    """Rank 0 alone gets Ctrl-C during step 0: both ranks stop after it and save one checkpoint."""
    def ctrl_c(step, runner, tok, batch, m):
        if rank == 0 and step == 0:
            os.kill(os.getpid(), signal.SIGINT)
    real = bupo.readout_entropies
    update.problem_reward = text_reward
    steps = []
    bupo.readout_entropies = lambda *a, **kw: (steps.append(len(steps)), ctrl_c(steps[-1], None, None, None, None),
                                               real(*a, **kw))[2]
    with pytest.raises(Stopped, match="after step 0 of"):
        bupo.train_bupo(cfg, 1, tiny_model("llama"), FakeTok())


def test_checkpoint_of_two_fsdp_ranks_resumes_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(update, "problem_reward", text_reward)
    full, _, _ = bupo.train_bupo(bupo_cfg(tmp_path / "one", steps=3), 1, tiny_model("llama"), FakeTok())
    cfg = bupo_cfg(tmp_path / "two", steps=3, fsdp=True)
    spawn(stop_after_first_step, 2, cfg)
    assert torch.load(tmp_path / "two" / "run" / "checkpoint" / "trainer.pt", weights_only=False)["world"] == 2
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    resumed, _, _ = bupo.train_bupo(replace(cfg, fsdp=False, resume=True), 1, None, None)
    assert [m["step"] for m in resumed] == [0, 1, 2]
    assert_same_metrics(resumed, full)  # optimizer moments and step count carried over, not restarted


def collectives(rank, result):
    assert distributed.init().world == 2
    rows = distributed.gather_rows(torch.tensor([[rank, 10 + rank]]))  # (1, 2) per rank
    sums = distributed.all_sum([1.5 * (rank + 1), rank])
    lists = distributed.gather_lists([f"r{rank}"] * (rank + 1))
    flags = [distributed.any_rank(rank == 1), distributed.any_rank(False)]
    if rank == 0:
        json.dump({"rows": rows.tolist(), "sums": sums, "lists": lists, "flags": flags}, open(result, "w"))


def test_collectives_reduce_across_ranks(tmp_path):
    spawn(collectives, 2, str(tmp_path / "r.json"))
    got = json.load(open(tmp_path / "r.json"))
    assert got == {"rows": [[0, 10], [1, 11]], "sums": [4.5, 1.0], "lists": ["r0", "r1", "r1"], "flags": [True, False]}
    assert distributed.all_sum([2.0]) == [2.0] and distributed.gather_lists([1]) == [1]  # one process: identity


def convert_default_model(rank, cache):
    """Each rank converts the GGUF into a cache of its own, as on nodes that share no disk."""
    distributed.init()  # under a process group, HF's save_pretrained writes on rank 0 only
    os.environ["BUPO_CACHE"] = f"{cache}{rank}"
    model, _ = models.load_model(dtype=torch.float32)
    assert model.config.num_hidden_layers == 30


def test_every_rank_can_convert_the_default_model(tmp_path):
    spawn(convert_default_model, 2, str(tmp_path / "cache"))
    for rank in (0, 1):
        assert ({"model.safetensors", "config.json", "tokenizer.json"}
                <= set(os.listdir(tmp_path / f"cache{rank}" / models.EMBEDDED["smollm2"].cache_name)))


def test_rank_share_splits_every_mini_batch_by_whole_prompts():
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    assert distributed.rank_share(order, 4, 0, 2).tolist() == [5, 2, 3, 6]
    assert distributed.rank_share(order, 4, 1, 2).tolist() == [7, 0, 1, 4]
    assert distributed.rank_share(order, 4, 0, 1).tolist() == order.tolist()


def test_bad_splits_are_clear_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="without splitting a group"):
        grpo.check_config(tiny_cfg(tmp_path, mini_batch_prompts=2), model.config, world=4)
    grpo.check_config(tiny_cfg(tmp_path, mini_batch_prompts=4, prompts_per_step=4), model.config, world=2)
    with pytest.raises(InputError, match="torchrun"):
        grpo.train(tiny_cfg(tmp_path, fsdp=True), model=model, tok=FakeTok())
