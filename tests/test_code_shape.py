"""The code's shape: every function of the package and of csrc/ fits a screen (80 lines), or says why not in a
comment starting with "Long:" right above it (above its template line or decorators)."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 80


def _comment_above(lines: list[str], index: int, marker: str) -> str:
    """The comment lines right above lines[index] (0-based), joined."""
    k = index
    while k > 0 and lines[k - 1].lstrip().startswith(marker):
        k -= 1
    return " ".join(lines[k:index])


def _python_functions():
    for path in sorted((ROOT / "kdkernels").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                yield path, node.name, node.end_lineno - node.lineno + 1, _comment_above(lines, first - 1, "#")


def _cxx_functions():
    """(path, first line, length, the line above) of each function defined at namespace level in csrc/: a line at
    column 0 that opens a parameter list, through the brace that closes its body."""
    for path in sorted(p for ext in ("*.h", "*.cpp", "*.cu", "*.cuh") for p in (ROOT / "csrc").rglob(ext)):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            starts = re.match(r"[A-Za-z_]", line) and "(" in line
            skipped = r"(namespace|struct|class|enum|extern|template|using|static_assert|TORCH_)"
            if starts and not re.match(skipped, line):
                k = i
                while k < len(lines) and not lines[k].rstrip().endswith(("{", ";")):
                    k += 1
                if k < len(lines) and lines[k].rstrip().endswith("{"):
                    depth, j = 0, k
                    while j < len(lines):
                        depth += lines[j].count("{") - lines[j].count("}")
                        if depth <= 0:
                            break
                        j += 1
                    start = i - (i > 0 and lines[i - 1].startswith("template"))
                    yield path, line, j - i + 1, _comment_above(lines, start, "//")
                    i = j
            i += 1


def test_functions_fit_a_screen_or_say_why():
    python = [(p, name, n) for p, name, n, above in _python_functions() if n > MAX_LINES and "# Long:" not in above]
    cxx = [(p, head[:60], n) for p, head, n, above in _cxx_functions() if n > MAX_LINES and "Long:" not in above]
    assert not python + cxx, f"functions over {MAX_LINES} lines without a '# Long:' reason above them: {python + cxx}"


def test_the_scanner_finds_long_functions():
    """The check can fail: it sees the long functions that carry a reason."""
    assert any(n > MAX_LINES for *_, n, _ in _python_functions())
    assert any(n > MAX_LINES for *_, n, _ in _cxx_functions())
