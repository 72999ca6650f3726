"""What every script of this project shares at the command line: one-line errors, flags from a dataclass, run dirs.

- InputError: something the user gave is wrong (a path, a data set, a setting). `run_main`
  prints it as one line, `error: <what is wrong and what to do>`, and exits with status 2;
  Stopped (a run interrupted on request, its work saved) exits with 130; Diverged (a run
  whose losses stayed non-finite) is one line too, with exit status 1; any other
  exception is a bug and keeps its traceback.
- parse_config: a typed @dataclass becomes argparse flags (help from the comment beside each
  field), over a preset; with --resume, over the config saved in the run dir.
- claim_run_dir: an output dir holds one run. It is checked writable before any work,
  locked while a process writes it (a second one stops at once), and never silently
  reused: a dir holding another run's results is refused unless the run is resumed with
  the same settings or --overwrite is given.

Imports nothing from the project: every other file may use it.
"""
import argparse
import contextlib
import fcntl
import inspect
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, fields

import torch


class InputError(ValueError):
    """A user's input is wrong; the message says what is wrong and what to do."""


class RunEnded(Exception):
    """A run ended by a stop, not by finishing: `what` says where, `advice` how to go on (experiment.py gives its
    own)."""

    def __init__(self, what, advice):
        super().__init__(f"{what}; {advice}")
        self.what = what


class Stopped(RunEnded):
    """A run stopped on request (Ctrl-C, SIGTERM), its checkpoint saved."""


class Diverged(RunEnded):
    """A run stopped because its losses or gradients stayed non-finite."""


SEEDS = range(2 ** 32)  # the seeds a run may use: seed * 1_000_003 + step must fit torch's 64-bit generator seed


def run_main(main, argv=None):
    """Call main(argv); an InputError becomes `error: ...` on stderr and exit status 2.

    First it flushes denormal floats to zero: very peaked softmaxes (the raw-residual
    internal policies) underflow into subnormals, which x86 computes ~100x slower; one
    BuPO update ran 3.5x faster so, with the same results (tests/test_policy.py). It must
    happen before the first parallel op, as only threads started later inherit it.
    """
    torch.set_flush_denormal(True)
    try:
        return main(argv)
    except InputError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        sys.exit(2)
    except Stopped as e:
        print("stopped: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(130)  # as a shell reports a run ended by Ctrl-C: not a success
    except Diverged as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- flags

def _field_help(cls):
    """{field: the comment beside it in the class body, with the comment-only lines right below it indented past it}."""
    src = "".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)
    out, last, indent = {}, None, 0
    for line in src.splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            last = name if name not in out else None  # a subclass's field comes first and wins
            out.setdefault(name, rest.split("#", 1)[1].strip())
            indent = len(line) - len(line.lstrip())
        elif line.strip().startswith("#") and last and len(line) - len(line.lstrip()) > indent:
            out[last] += " " + line.strip()[1:].strip()  # the comment goes on below the field, indented past it
        else:
            last = None
    return out


def parse_config(cls, presets, description=None, argv=None, default_preset="cpu"):
    """A cls instance from --preset plus the flags given; with --resume, from the run's saved config.json.

    Flags not given keep the preset's (or, resuming, the saved run's) values, so resuming
    needs no flag repeated; a flag given with --resume must be one the run may change
    (checked by claim_run_dir).
    """
    helps, p = _field_help(cls), argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(presets), help=f"settings to start from (default: {default_preset}): "
                   "cpu runs in minutes on a laptop CPU; paper is the authors' setting")
    base = cls(**presets[default_preset])
    for f in fields(cls):
        default, flag = getattr(base, f.name), "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=helps.get(f.name, ""))
        else:
            typ = {int: int, float: float}.get(f.type, str)
            p.add_argument(flag, type=typ, metavar=f.name.upper(),
                           help=f"{helps.get(f.name, '')} (preset {default_preset}: {default})")
    given = vars(p.parse_args(argv))
    start = presets[given.pop("preset", default_preset)]
    out = given.get("out", start.get("out", getattr(base, "out", None)))
    saved = os.path.join(out, "config.json") if out else None
    if given.get("resume") and saved and os.path.exists(saved):
        start = read_json(saved)
    known = {f.name for f in fields(cls)}
    values = {**{k: v for k, v in start.items() if k in known}, **given}
    for f in fields(cls):  # an `int | None` setting: an integer, or auto (None), parsed here once
        if f.type == int | None and f.name in values:
            values[f.name] = int_or_auto("--" + f.name.replace("_", "-"), values[f.name])
    return cls(**values)


def int_or_auto(flag, value):
    """The value of an `int | None` setting from its flag's text (or a saved config): an integer, or None for auto."""
    if value is None or type(value) is int:
        return value
    if value != "auto" and not re.fullmatch(r"-?\d+", str(value)):  # not int()'s "+4", " 4" or "4_0" (= 40)
        raise InputError(f"{flag} must be an integer or auto, got '{value}'")
    return None if value == "auto" else int(value)


def read_json(path):
    """A JSON file, or an InputError naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); restore it, or move {os.path.dirname(path) or '.'} aside "
                         "(mv it to a new name: nothing is lost) and start afresh") from e


def read_jsonl(path):
    """The records of a JSON-lines file ([] if absent). A last line cut off mid-write (a killed run) is dropped;
    a bad line elsewhere is an InputError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was interrupted
                break
            raise InputError(f"{path}, line {i + 1}, is not valid JSON ({e}); fix or delete that line") from e
    return out


def write_json(path, obj):
    """Write a JSON file atomically (a temp file, fsynced, then renamed): a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    """Write records as JSON lines in place of path's content, atomically (a temp file, fsynced, then renamed):
    a resumed run drops a cut last line or what followed its checkpoint before appending."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check(ok, message):
    """Raise InputError(message) unless ok: settings are checked before any work."""
    if not ok:
        raise InputError(message)


def check_seed(seed, flag="--seed"):
    """A seed in SEEDS, or an InputError naming the flag and the range."""
    check(seed in SEEDS, f"{flag} must lie in 0..{SEEDS[-1]}, got {seed}")


# ----------------------------------------------------------------------------- run dirs

@contextlib.contextmanager
def claim_run_dir(path, settings, *, resume=False, overwrite=False, mutable=(), writer=True):
    """Hold `path` for one run: writable, locked, never mixed with another run's outputs.

    settings: a dict (or dataclass) saved as path/config.json. A dir that already holds a
    config.json is another run's, or an earlier part of this one: it is refused unless
    resume is set and the settings agree (fields in `mutable` may change: they do not
    alter what was computed) or overwrite is set, which empties the dir first.
    writer=False (torchrun ranks other than 0): only waits for nothing and yields.
    """
    if not writer:
        yield
        return
    settings = asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to the output dir {path} ({e.strerror}); pass a writable --out") from e
    with open(os.path.join(path, ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"another process (pid {lock.read().strip() or '?'}) is writing {path}; "
                             "wait for it to finish or pass another --out") from None
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        _reconcile(path, settings, resume, overwrite, mutable)
        write_json(os.path.join(path, "config.json"), settings)
        yield


def settings_diff(saved, settings, mutable=()):
    """The fields in which two runs' settings differ, sorted; those in `mutable` and how a run was started
    (resume, overwrite, out) are not compared: they do not alter what is computed."""
    skip = set(mutable) | {"resume", "overwrite", "out"}
    return [k for k in sorted(set(saved) | set(settings)) if k not in skip and saved.get(k) != settings.get(k)]


def _reconcile(path, settings, resume, overwrite, mutable):
    """Empty the dir (overwrite), check the saved settings (resume), or refuse a dir that holds a run."""
    saved_path = os.path.join(path, "config.json")
    if overwrite:
        for name in os.listdir(path):
            if name != ".lock":
                full = os.path.join(path, name)
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        return
    if not os.path.exists(saved_path):
        held = sorted(n for n in os.listdir(path) if not n.startswith("."))
        if held:  # outputs whose settings are unknown: never overwritten, whatever --resume says
            raise InputError(f"{path} holds outputs ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) "
                             f"but no config.json, so what made them is unknown; move {path} aside "
                             "(mv it to a new name: nothing is lost) and rerun, or pass --overwrite to delete them")
        return
    if not resume:
        raise InputError(f"{path} holds a run already; continue it with --resume, replace it with --overwrite, "
                         "or pass another --out")
    saved = read_json(saved_path)
    diff = settings_diff(saved, settings, mutable)
    if diff:
        what = ", ".join(f"{k} ({saved.get(k)!r} there, {settings.get(k)!r} now)" for k in diff)
        raise InputError(f"{path} holds a run with other settings: {what}. Resume with its settings, "
                         "or start afresh with --overwrite or another --out")
