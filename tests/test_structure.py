"""The project's shape: imports go one way (README, "The files"), and no project import hides inside a function."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["cli", "report", "problems", "decompose", "policy", "engine", "rollout", "grade", "evaluate", "entropy",
         "distributed", "checkpoints", "loss", "config", "grpo", "bupo"]


def project_imports(tree):
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
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
