"""The import structure of dmd2/: its sub-packages depend on each other in one direction only (the layering), no
import cycle (top-level or inside functions), and a config path without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmd2"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The dmd2 modules an AST imports anywhere (module level, functions, conditional blocks). ``from a import b``
    counts as importing a.b when that is a module, else a."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import dmd2.a.b.c: the longest known module prefix
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """dmd2 module -> the dmd2 modules it imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path):] = "open", [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_graph_sees_top_level_function_level_and_relative_imports():
    known = {"dmd2", "dmd2.x", "dmd2.y", "dmd2.z", "dmd2.sub", "dmd2.sub.w"}
    source = ("import os\nimport dmd2.x\nfrom dmd2 import y\n"
              "def f():\n    from dmd2.z import thing\n    from . import w\n")
    assert imported_modules(ast.parse(source), "dmd2.sub.v", False, known) == {"dmd2.x", "dmd2.y", "dmd2.z",
                                                                                 "dmd2.sub.w"}
    graph = import_graph()
    assert "dmd2.io.sampler" in graph["dmd2.io.loaded"] and "dmd2.config.settings" in graph["dmd2.io.weights"]


# What each sub-package may import (besides itself): dependencies point down, from train (which may import
# anything) to config and method at the bottom. The method's mathematics and the networks know nothing of runs,
# files, measurements or configs; the configuration knows nothing of torch.
LAYERS = {
    "config": set(),
    "method": set(),
    "networks": {"method"},
    "runtime": {"config"},
    "data": {"config", "method", "runtime"},
    "io": {"config", "method", "networks", "runtime", "data"},
    "eval": {"config", "method", "networks", "runtime", "data", "io"},
    "train": {"config", "method", "networks", "runtime", "data", "io", "eval"},
}


def sub_package(module: str) -> str | None:
    """dmd2.method.losses -> method; dmd2.networks -> networks; dmd2.export (an entry point) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {dep}" for module, deps in graph.items() if (room := sub_package(module))
                  for dep in deps if (other := sub_package(dep)) not in (room, None) and other not in LAYERS[room])


def test_layering_finds_an_upward_import():
    graph = {"dmd2.method.losses": {"dmd2.config.settings", "dmd2.method.edm"}, "dmd2.train.loop": {"dmd2.io.files"},
             "dmd2.config.cli": {"dmd2.config.errors"}}
    assert layering_violations(graph) == ["dmd2.method.losses -> dmd2.config.settings"]


def test_sub_packages_import_only_the_layers_below_them():
    graph = import_graph()
    assert set(LAYERS) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}, "a sub-package lacks a layer"
    assert layering_violations(graph) == []
    entry_points = {m for m in graph if m.count(".") == 1 and sub_package(m) is None} - {"dmd2.version"}
    assert entry_points == {"dmd2.export", "dmd2.import_edm", "dmd2.import_dmd2", "dmd2.compare"}, entry_points


def test_the_config_package_imports_no_torch_even_inside_functions():
    heavy = ("torch", "torchvision", "cleanfid", "wandb", "numpy")
    found = []
    for path in (PACKAGE / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert found == []


def test_dmd2_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_config_path_does_not_import_torch():
    """What --help and tab completion load (the settings, config checks and error handling, and the scripts' own
    modules) must not import torch: it takes seconds."""
    code = ("import sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import dmd2.config.settings, dmd2.config.validate, dmd2.config.cli, dmd2.config.errors, dmd2.config.seeds, dmd2.train.plan\n"
            "import train, evaluate, generate\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'cleanfid', 'wandb') if m in sys.modules)\n"
            "print(','.join(heavy) or 'none')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "none", f"the config path imported {proc.stdout.strip()}"


def test_functions_and_benchmark_files_stay_short():
    """No function over 90 lines in the package and the scripts, no benchmark file over 600 lines: a newcomer
    reads each in one sitting."""
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / name for name in ("train.py", "evaluate.py", "generate.py"))]
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sources for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 90]
    assert long == []
    big = [p.name for p in (ROOT / "benchmarks").glob("*.py") if len(p.read_text().splitlines()) > 600]
    assert big == []


@pytest.mark.slow
def test_the_declared_train_metrics_are_what_the_stages_log(tmp_path):
    """The train/ names the objective check accepts (dmd2.train.objective.train_metric_keys, from the stages and
    the loop that emit them) are exactly the scalars a teacher and a full-method distillation write to
    metrics.jsonl; a name the code stops logging, or starts logging, fails here."""
    import json

    from dmd2.train.objective import train_metric_keys
    from tests.conftest import compose_cfg
    from train import train

    # three steps: the distillation's generator updates at steps 0 and 2 (ratio 2), and its GAN / DM gradient ratio
    # is undefined at the first (the DM gradient is exactly zero while the fake score network equals the teacher)
    common = ["debug=smoke", "max_steps=3", "logger=none", "sample_every=0"]
    runs = {"teacher": [], "distill": ["experiment=cpu_smoke", f"teacher_checkpoint={tmp_path / 'teacher' / 'teacher_final.pt'}"]}
    for stage, extra in runs.items():
        train(compose_cfg([*common, *extra, f"output_dir={tmp_path / stage}"]))
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        logged = sorted({k for row in rows for k in row if k.startswith("train/")})
        assert logged == train_metric_keys(stage, gan_classifier=stage == "distill"), stage
