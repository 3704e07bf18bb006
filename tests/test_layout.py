"""The shape the code keeps (docs/architecture.md): packages by role, short modules and
functions, thin jobs, a pure core that imports no Ray, and no path outside the repository."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_JOB_LINES = 450, 80, 60


def modules():
    return sorted(p for p in (REPO / "raydpo").rglob("*.py") if "__pycache__" not in p.parts)


def test_one_package_per_role():
    for role in ("data", "train", "sampler", "judge", "policy", "online"):
        assert (REPO / "raydpo" / role / "__init__.py").is_file(), role


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {n} lines"


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_jobs_are_thin(path):
    assert len(path.read_text().splitlines()) < MAX_JOB_LINES


def test_the_pure_core_imports_without_ray():
    pure = ["raydpo.losses", "raydpo.records", "raydpo.errors", "raydpo.data", "raydpo.data.formats",
            "raydpo.data.tokenize", "raydpo.data.collate", "raydpo.data.store", "raydpo.judge.rules",
            "raydpo.judge.kinds", "raydpo.online.pairs", "raydpo.config", "raydpo.weights"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in pure)
            + "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_reference_outside_the_repository():
    for path in [*modules(), *(REPO / "jobs").glob("*.py"), REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        assert "../shared" not in path.read_text(), path
