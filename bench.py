"""Every benchmark of the project, one subcommand each; speed is measured here, never asserted in a test.

    python bench.py rollout [--device cuda --random-weights qwen3-0.6b ...]
        # the rollout engine vs HF generate (bench_rollout.py)
    python bench.py grpo [grpo.py's flags]
        # one GRPO step's parts, each speed-up switched off in turn (bench_train.py)
    python bench.py bupo [bupo.py's flags]   # one BuPO phase-1 update against a full one (bench_train.py)

`python bench.py SUBCOMMAND --help` lists a subcommand's flags.
"""
import sys

from bench_rollout import bench_rollout, rollout_args
from bench_train import bench_bupo_update, bench_grpo_step
from cli import InputError, parse_config, run_main
from config import BUPO_PRESETS, PRESETS, BuPOConfig, GRPOConfig, preset_help

SUBCOMMANDS = ("rollout", "grpo", "bupo")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        raise InputError(f"name a benchmark first: python bench.py {{{','.join(SUBCOMMANDS)}}} [flags] "
                         f"(got {argv[0] if argv else 'none'!r}); see python bench.py SUBCOMMAND --help")
    what, rest = argv[0], argv[1:]
    if what == "rollout":
        return bench_rollout(rollout_args(rest))
    if what == "grpo":
        return bench_grpo_step(parse_config(GRPOConfig, PRESETS,
                                            "Time one GRPO step's parts. " + preset_help(PRESETS), rest))
    return bench_bupo_update(parse_config(BuPOConfig, BUPO_PRESETS,
                                          "Time one BuPO phase-1 update. " + preset_help(BUPO_PRESETS), rest))


if __name__ == "__main__":
    run_main(main)
