"""The declared minimum Python (setup.py `python_requires`) is the one the code needs, as vermin reads it."""

import ast
import re
from pathlib import Path

import vermin

REPO = Path(__file__).resolve().parent.parent


def declared_minimum() -> tuple[int, int]:
    """`python_requires=">=X.Y"` from setup.py, as (X, Y)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    spec = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "python_requires"
    )
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec)
    assert match, f"python_requires should be a plain lower bound, got {spec!r}"
    return int(match[1]), int(match[2])


def sources() -> list[Path]:
    """Every Python file the project ships or runs: library, web app, flows, benchmarks, tests, setup.py."""
    files = [
        REPO / "setup.py",
        *sorted((REPO / "cxr").rglob("*.py")),
        *sorted((REPO / "cxr_app").rglob("*.py")),
    ]
    for folder in ("flows", "bench", "tests"):
        files += sorted((REPO / folder).glob("*.py"))
    return files


def test_python_requires_is_what_the_code_needs():
    needs: dict[Path, tuple[int, int]] = {}
    for path in sources():
        minimum = vermin.detect(path.read_text(encoding="utf-8"), path=str(path))[1]
        if minimum:
            needs[path.relative_to(REPO)] = tuple(minimum[:2])
    required = max(needs.values())
    newest = sorted(str(p) for p, v in needs.items() if v == required)[:3]
    assert declared_minimum() == required, (
        f"setup.py declares Python >={'.'.join(map(str, declared_minimum()))} but the code needs "
        f"{'.'.join(map(str, required))} (e.g. {', '.join(newest)})"
    )
