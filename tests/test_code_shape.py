"""proxy.py reads top-down: no section uses a module-level name that a later section defines."""

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "proxy.py"
BANNER = re.compile(r"^# \d+\. ")


def defined_names(statement: ast.stmt) -> set:
    if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
        return {statement.name}
    targets = statement.targets if isinstance(statement, ast.Assign) else \
        [statement.target] if isinstance(statement, ast.AnnAssign) else []
    return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}


def bound_inside(statement: ast.stmt) -> set:
    """Names a definition binds for itself (parameters, local variables): they hide the module's."""
    nodes = list(ast.walk(statement))
    bound = {node.id for node in nodes if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    return (bound | {node.arg for node in nodes if isinstance(node, ast.arg)}) - defined_names(statement)


def test_no_section_uses_a_name_defined_in_a_later_section():
    text = SOURCE.read_text()
    lines = text.splitlines()
    starts = [number for number, line in enumerate(lines, 1)
              if BANNER.match(line) and lines[number - 2].startswith("# ===")]
    assert len(starts) >= 10, "the section banners were not found"

    def section(line: int) -> int:
        return sum(start <= line for start in starts)

    module = ast.parse(text)
    home = {name: section(statement.lineno) for statement in module.body for name in defined_names(statement)}
    backward = set()
    for statement in module.body:
        local = bound_inside(statement)
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local \
                    and home.get(node.id, 0) > section(node.lineno):
                backward.add((node.id, section(node.lineno), home[node.id]))
    assert not backward, f"(name, used in section, defined in later section): {sorted(backward)}"
