"""checkpoints.py: a kill between any two operations of a save leaves a whole checkpoint, old or new."""
import os
import shutil

import pytest
import torch

import checkpoints
from cli import InputError
from conftest import FakeTok, fake_load, tiny_cfg, tiny_model
from distributed import Dist, Wrapped


class Killed(Exception):
    pass


def save(out, step, model):
    runner = Wrapped(model)
    checkpoints.save_checkpoint(str(out), runner, FakeTok(), torch.optim.AdamW(model.parameters()), step,
                                tiny_cfg(out), Dist())


@pytest.mark.parametrize("kill_at", range(6))
def test_a_kill_anywhere_in_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, kill_at):
    """Each rename and delete of the second save fails in turn (as a kill -9 would stop there): what is left loads."""
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    save(tmp_path, 1, tiny_model("llama"))
    ops, calls = {"rename": os.rename, "rmtree": shutil.rmtree}, []

    def counted(name):
        def op(*a, **k):
            calls.append(name)
            if len(calls) > kill_at:
                raise Killed(name)
            return ops[name](*a, **k)
        return op
    monkeypatch.setattr(checkpoints.os, "rename", counted("rename"))
    monkeypatch.setattr(checkpoints.shutil, "rmtree", counted("rmtree"))
    try:
        save(tmp_path, 2, tiny_model("llama", seed=1))
        killed = False
    except Killed:
        killed = True
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints, "load_model", fake_load)
    model, _, state = checkpoints.load_checkpoint(str(tmp_path), "cpu")
    want = tiny_model("llama", seed=1 if state["step"] == 2 else 0)
    assert state["step"] in (1, 2) and (killed or state["step"] == 2)
    # the weights of that step, whole
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), want.parameters()))
    save(tmp_path, 3, tiny_model("llama"))  # the next save cleans up after the killed one
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint"]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        checkpoints.load_checkpoint(str(tmp_path), "cpu")
