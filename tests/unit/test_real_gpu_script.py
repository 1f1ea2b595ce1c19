"""bench/real_gpu.sh, the one device call: its `tests` stage runs every test of tests/ that needs a CUDA device
(bench/real_gpu_tests.txt), and the script parses. Device time is rare and short (a fresh machine, 15 minutes a task):
a `cuda` test missing from the list would go unrun at the next device run, as the quota test's "cuda" case did
through round 35."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "bench" / "real_gpu_tests.txt"


def _listed() -> list[str]:
    lines = (line.strip() for line in LIST.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _needs_cuda(source: str, node: ast.AST, cuda_names: set[str]) -> bool:
    """A test that skips without CUDA: a decorator that is such a mark (by name or as written), or a body that
    calls pytest.skip where torch sees no CUDA device."""
    assert isinstance(node, ast.FunctionDef)
    for dec in node.decorator_list:
        if isinstance(dec, ast.Name) and dec.id in cuda_names:
            return True
        if "cuda.is_available" in (ast.get_source_segment(source, dec) or ""):
            return True
    body = ast.get_source_segment(source, node) or ""
    return "cuda.is_available" in body and "pytest.skip(" in body


def _cuda_tests() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "tests").glob("*/test_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        cuda_names = {
            target.id
            for stmt in tree.body
            if isinstance(stmt, ast.Assign) and "cuda.is_available" in (ast.get_source_segment(source, stmt) or "")
            for target in stmt.targets
            if isinstance(target, ast.Name) and "skipif" in (ast.get_source_segment(source, stmt) or "")
        }
        for stmt in tree.body:
            is_test = isinstance(stmt, ast.FunctionDef) and stmt.name.startswith("test")
            if is_test and _needs_cuda(source, stmt, cuda_names):
                found.append((str(path.relative_to(ROOT)), stmt.name))
    return found


def test_every_test_that_needs_cuda_is_in_the_tests_stage() -> None:
    listed = _listed()
    cuda = _cuda_tests()
    assert len(cuda) >= 20  # the scan finds them (round 36: 24 in 9 files)
    missing = [
        f"{path}::{name}"
        for path, name in cuda
        if path not in listed and not any(entry.split("[")[0] == f"{path}::{name}" for entry in listed)
    ]
    assert not missing, f"add to {LIST.name}: {missing}"


def test_every_listed_test_exists() -> None:
    for entry in _listed():
        path, _, name = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        if name:
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), entry


def test_the_script_parses_and_names_its_stages() -> None:
    script = ROOT / "bench" / "real_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'STAGES=" ${STAGES:-info tests tiny probe native big} "' in text
    assert "real_gpu_tests.txt" in text and "--bulk-listen" in text
