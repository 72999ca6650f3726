"""The project's shape: imports go one way (README, "The files"), and no project import hides inside a function."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["cli", "hardware", "stats", "problems", "models", "decompose", "policy", "sampling", "kvcache", "graphs",
         "decode", "rollout", "answers", "grade", "rewards", "evaluate", "entropy", "lens", "probe", "distributed",
         "checkpoints", "loss", "advantages", "critic", "config", "update", "grpo", "results", "bupo", "experiment",
         "bench_rollout", "bench_train", "bench"]


def project_imports(tree):
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name and name.split(".")[0] in ORDER:
                yield node, name.split(".")[0]


def test_imports_go_one_way_and_sit_at_the_top():
    assert sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")) == sorted(ORDER)
    for i, name in enumerate(ORDER):
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        top = set(map(id, tree.body))
        for node, target in project_imports(tree):
            assert ORDER.index(target) < i, f"{name}.py imports {target}, which comes after it"
            assert id(node) in top, f"{name}.py imports {target} inside a function"


def readme_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("bash\n")]


def test_the_files_table_lists_the_files_in_import_order():
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("## The files"):text.index("### From the paper")]
    listed = [line.split("`")[1][:-3] for line in table.splitlines() if line.startswith("| `")]
    assert listed == ORDER


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    """.ci/run = README's set-up block without its last line (the main job), then README's test command."""
    setup, tests = readme_blocks()[:2]
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line and not line.startswith("#")]
    setup_lines = setup.strip().splitlines()
    assert setup_lines[-1] == "python experiment.py"
    for line in setup_lines[:-1]:
        assert line in ci, f".ci/run lacks the README's set-up line {line!r}"
    assert any(line.startswith(tests.strip() + " ") or line == tests.strip()
               for line in ci), ".ci/run does not run the README's test command"


def test_ci_runs_every_command_of_the_gpu_check_on_cpu():
    """.ci/run runs .ci/gpu-check --cpu, so the GPU check's flags are run on every CI run (issue 29)."""
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line and not line.startswith("#")]
    assert any(line.split()[-2:] == [".ci/gpu-check", "--cpu"] for line in ci)
