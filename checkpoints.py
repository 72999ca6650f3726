"""A run's persistence: checkpoints that survive a kill at any instant and resume on any number of ranks, the metrics
log, Ctrl-C.

Used by grpo.train (and so bupo.py). A checkpoint is out/checkpoint/: the model in
Hugging Face format plus trainer.pt with the AdamW state keyed by parameter name, the RNG
states and the next step. Saved from N ranks (distributed.py gathers FSDP shards), it
resumes on any number of ranks: `--resume` loads it, and the metrics logged after it are
dropped, so a resumed run reproduces an uninterrupted one.

A save writes checkpoint.tmp<pid>/, moves the old checkpoint aside to checkpoint.old/,
renames the new one into place, then deletes the old one: a kill between any two of
these leaves checkpoint/ or checkpoint.old/ whole, and load_checkpoint takes whichever
exists. Left-over checkpoint.tmp* dirs (a killed save) are deleted at the next save or load.
"""
import glob
import os
import pickle
import random
import shutil
import signal
import threading
from dataclasses import asdict

import torch
from tqdm import tqdm

import distributed
from cli import InputError, read_json, read_jsonl, settings_diff, write_json
from models import load_model


class RunDamaged(InputError):
    """A run dir whose files cannot be read or disagree. `what` names them; the message adds how to start grpo.py's
    run afresh (experiment.py catches it and names its own way: the run moved aside is trained again)."""

    def __init__(self, what, out):
        super().__init__(f"{what}; start the run afresh: move {out} aside (mv it to a new name: nothing is lost) "
                         "and rerun without --resume, or rerun with --overwrite")
        self.what = what


def _clean_partial(out):
    """Delete the dirs of saves that were killed midway (the run dir is locked: none is being written)."""
    for tmp in glob.glob(os.path.join(out, "checkpoint.tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    """Flush every file and dir under path to the disk: the renames that follow must not outrun the data."""
    for root, _, files in os.walk(path):
        for name in files + ["."]:
            _fsync(os.path.join(root, name))


def save_checkpoint(out, runner, tok, optimizer, step, cfg, d, critic=None):
    """out/checkpoint: the model in HF format, optimizer state by parameter name, RNG states, the next step;
    with critic = (module, optimizer) (PPO, one process) also critic.pt, both their states.

    All ranks call (FSDP gathers the shards); rank 0 writes. Each operation leaves a whole checkpoint behind;
    a full disk is a one-line error that keeps the last whole checkpoint.
    """
    model_sd, optim_sd = distributed.model_state(runner), distributed.optimizer_state(runner, optimizer)
    if not d.main:
        return
    _clean_partial(out)
    final, old, tmp = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.old", f"checkpoint.tmp{os.getpid()}"))
    try:
        distributed.inner(runner).model.save_pretrained(os.path.join(tmp, "model"), state_dict=model_sd)
        tok.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"optimizer": optim_sd, "step": step, "config": asdict(cfg), "world": d.world,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   os.path.join(tmp, "trainer.pt"))
        if critic is not None:
            torch.save({"model": critic[0].state_dict(), "optimizer": critic[1].state_dict()},
                       os.path.join(tmp, "critic.pt"))
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the checkpoint of {out} before this one is kept" if checkpoint_path(out) else "no checkpoint was kept"
        raise InputError(f"could not save the checkpoint after step {step} in {out} ({e}); {kept}: free disk space "
                         "and continue with --resume") from e
    if os.path.exists(final):
        if os.path.exists(old):  # a save killed after its rename: checkpoint/ is the newer, whole one
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(out)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(out):
    """The whole checkpoint of a run dir: checkpoint/, or checkpoint.old/ after a kill between the two renames; else
    None."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer.pt")):
            return path
    return None


def remove_checkpoint(out):
    """Delete a run's checkpoint (a finished run of an experiment that keeps only its metrics)."""
    for name in ("checkpoint", "checkpoint.old"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    _clean_partial(out)


def load_checkpoint(out, device):
    """(model, tok, trainer state) from the run's checkpoint; the state is loaded into the optimizer once it exists."""
    path = checkpoint_path(out)
    if path is None:
        raise InputError(f"--resume: no checkpoint in {out}; start afresh with --overwrite (or another --out)")
    _clean_partial(out)
    model, tok = load_model(os.path.join(path, "model"), dtype=torch.float32, device=device)
    state = _load_state(os.path.join(path, "trainer.pt"), "cpu", weights_only=False,
                        keys=("optimizer", "step", "config", "torch_rng", "python_rng"))
    if os.path.exists(os.path.join(path, "critic.pt")):
        state["critic"] = _load_state(os.path.join(path, "critic.pt"), device, weights_only=True)
    return model, tok, state


def _load_state(path, device, weights_only, keys=()):
    try:
        state = torch.load(path, map_location=device, weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError,
            ImportError, TypeError, UnicodeDecodeError) as e:  # truncated, overwritten, or not a torch file at all
        state, err = None, str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        err = None if isinstance(state, dict) and set(keys) <= set(state) else "not a trainer state"
    if err is not None:
        raise RunDamaged(f"{path} is damaged ({err}): the checkpoint cannot be resumed",
                         os.path.dirname(os.path.dirname(path)))
    return state


def read_metrics(path, before_step):
    """Logged steps < before_step (a resumed run rewrites what followed its checkpoint)."""
    return [m for m in read_jsonl(path) if m["step"] < before_step]


def check_resume(out, state, settings, mutable, history):
    """Refuse a resume whose checkpoint disagrees with the run dir: config.json edited since the checkpoint was saved
    (its settings are compared as a changed flag is: all but `mutable`), or a metrics log that lacks a step the
    checkpoint has trained (a line cut or deleted: it cannot be recomputed, and the run would never count as done)."""
    saved = state["config"]
    diff = settings_diff(saved, settings, mutable)
    if diff:
        what = ", ".join(f"{k} ({saved.get(k)!r} in the checkpoint, {settings.get(k)!r} in config.json)" for k in diff)
        raise InputError(f"{out}/config.json was changed after its checkpoint was saved: {what}; put the checkpoint's "
                         "value(s) back in config.json and resume, or start afresh with --overwrite (or another --out)")
    missing = sorted(set(range(state["step"])) - {m["step"] for m in history})
    if missing:
        steps = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise RunDamaged(f"{out}/metrics.jsonl lacks the record of step(s) {steps}, which its checkpoint (after step "
                         f"{state['step'] - 1}) has trained: a line was cut or deleted, and the checkpoint cannot "
                         "recompute it", out)


# ----------------------------------------------------------------------------- the non-finite stop

def divergence_path(out):
    """out/nonfinite.json: where a run stopped for non-finite losses says which lr failed (a resume may lower it)."""
    return os.path.join(out, "nonfinite.json")


def mark_divergence(out, record):
    write_json(divergence_path(out), record)


def lr_may_change(out, lr):
    """("lr",) if the run in out stopped for non-finite losses and lr is lower than the one that failed, else ()."""
    path = divergence_path(out)
    return ("lr",) if os.path.exists(path) and lr < read_json(path)["lr"] else ()


def clear_divergence(out):
    """Forget the non-finite stop once a checkpoint of the lowered lr is saved: that lr is the run's from then on."""
    if os.path.exists(divergence_path(out)):
        os.remove(divergence_path(out))


class StopRequest:
    """Ctrl-C or SIGTERM (what `timeout`, schedulers and `docker stop` send) sets a flag; the loop saves a checkpoint at
    the end of the step and stops. A second Ctrl-C kills.

    Under torchrun (several ranks) the later signals are ignored, as torchrun forwards
    its own copy: it waits 30 s for the workers, then kills them.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world=1):
        self.requested, self.world, self.old = False, world, {}

    def __enter__(self):
        if _main_thread():
            self.old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, _frame):
        self.requested = True
        signal.signal(signum, self.old[signum] if self.world == 1 else signal.SIG_IGN)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tqdm.write(f"{name}: finishing this step, saving a checkpoint, then stopping"
                   + (" (Ctrl-C again to abort)" if self.world == 1 else ""))

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


def _main_thread():
    return threading.current_thread() is threading.main_thread()
