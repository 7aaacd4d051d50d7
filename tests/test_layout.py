"""The module docstring's promise, checked: the file reads top to bottom.

Each top-level name may use only names defined in its own section or an
earlier one, counting names used inside function bodies (what runs at call
time), so the file could be cut at any banner; only main() may use
everything. The docstring's section list is the list of banners.
"""

import ast
import os
import re

from conftest import ROOT

SOURCE_PATH = os.path.join(ROOT, "agent_relay.py")
BANNER_RULE = "# " + "-" * 75
BANNER_TITLE_RE = re.compile(r"^# (\d+)\. (.+)$")
DOCSTRING_SECTION_RE = re.compile(r"^ {0,2}(\d+)\. (.+?)(?: {2,}|$)")


def read_source():
    with open(SOURCE_PATH, encoding="utf-8") as source:
        return source.read()


def banners(source):
    """[(line number, section number, title)] for every `# N. Title` under a rule."""
    lines = source.splitlines()
    found = []
    for index, line in enumerate(lines[1:], 1):
        match = BANNER_TITLE_RE.match(line)
        if match and lines[index - 1] == BANNER_RULE:
            found.append((index + 1, int(match.group(1)), match.group(2)))
    return found


def section_of(lineno, found):
    number = 0
    for line, section, _ in found:
        if line <= lineno:
            number = section
    return number


def defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def layering_violations(source):
    """[(user, its section, used name, that name's section)] where a name reaches down the file."""
    found = banners(source)
    tree = ast.parse(source)
    home = {}
    for node in tree.body:
        for name in defined_names(node):
            home.setdefault(name, section_of(node.lineno, found))
    violations = set()
    for node in tree.body:
        names = defined_names(node)
        if not names or names == ["main"]:
            continue
        section = section_of(node.lineno, found)
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and home.get(used.id, 0) > section:
                violations.add((names[0], section, used.id, home[used.id]))
    return sorted(violations)


def test_each_section_uses_only_names_from_itself_or_above():
    assert layering_violations(read_source()) == []


def test_the_layering_check_sees_a_call_inside_a_function_body():
    source = "\n".join([BANNER_RULE, "# 1. Early", BANNER_RULE, "def early():", "    return late()", "",
                        BANNER_RULE, "# 2. Late", BANNER_RULE, "def late():", "    return 1", ""])
    assert layering_violations(source) == [("early", 1, "late", 2)]


def test_the_docstring_lists_exactly_the_banners():
    source = read_source()
    docstring = ast.get_docstring(ast.parse(source))
    listed = [(int(m.group(1)), m.group(2)) for m in map(DOCSTRING_SECTION_RE.match, docstring.splitlines()) if m]
    assert listed == [(number, title) for _, number, title in banners(source)]
    assert [number for number, _ in listed] == list(range(1, len(listed) + 1))


def test_the_request_path_in_the_docstring_names_what_the_file_defines():
    source = read_source()
    docstring = ast.get_docstring(ast.parse(source))
    path = docstring[docstring.index("names to search for):") + len("names to search for):"):].split("\n\n")[0]
    steps = [re.sub(r"\([^)]*\)", "", step) for step in re.split(r"->|, and then", path)]
    names = {re.match(r"\s*(\w+)", step).group(1) for step in steps} | set(re.findall(r"\.(\w+)", path))
    defined = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assert {"main", "serve", "RelayServer", "RelayHandler", "execute", "Store"} <= names
    assert sorted(names - defined) == []


def test_the_file_cut_at_a_feature_banner_still_runs(tmp_path):
    """Sections 13 on are optional: the file cut before any of them is a working relay and CLI."""
    import subprocess
    import sys
    source = read_source()
    lines = source.splitlines(keepends=True)
    for line, number, title in banners(source):
        if number < 13:
            continue
        cut = tmp_path / ("cut_before_%d.py" % number)
        tail = 'if __name__ == "__main__":\n    sys.exit(main())\n'
        cut.write_text("".join(lines[:line - 2]) + tail, encoding="utf-8")
        done = subprocess.run([sys.executable, str(cut), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (title, done.stderr)
        assert ("codex" in done.stdout) == (number > 16), title
