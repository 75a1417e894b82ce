"""The README's tables of figures come from the results files: each sits between markers naming its file and the
command that wrote it, `benchmarks/readme_tables.py` renders it from that file alone, and here the README must
equal the rendering. A table of figures outside the markers fails too."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_FIGURES = ("| path | what |",)  # tables of words (the layout)


def readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_equals_its_results_file():
    rt = readme_tables()
    text = README.read_text()
    blocks = rt.BLOCK.findall(text)
    assert {b[1] for b in blocks} == set(rt.RENDERERS), "a renderer without its table, or the other way round"
    rendered, changed = rt.render(text)
    assert not changed, f"README tables differ from their files (run benchmarks/readme_tables.py): {changed}"
    assert rendered == text


def test_each_table_names_an_existing_file_and_command():
    rt = readme_tables()
    makefile = (ROOT / "Makefile").read_text()
    for _, name, file, command, _, _ in rt.BLOCK.findall(README.read_text()):
        assert (ROOT / file).is_file(), f"table {name}: {file} does not exist"
        if command.startswith("make "):
            assert re.search(rf"^{command.split()[1]}:", makefile, re.M), f"table {name}: no target in {command}"
        else:
            script = next(w for w in command.split() if w.endswith(".py"))
            assert (ROOT / script).is_file(), f"table {name}: {script} does not exist"


def test_the_presets_file_is_what_the_code_computes():
    rt = readme_tables()
    assert json.loads((ROOT / "benchmarks" / "results" / "presets.json").read_text())["presets"] == rt.preset_counts()


def test_no_table_of_figures_outside_the_markers():
    inside, table, outside = False, [], []
    for line in README.read_text().splitlines() + [""]:
        if line.startswith("<!-- table: "):
            inside = True
        elif line.startswith("<!-- /table"):
            inside = False
        elif line.startswith("|") and not inside:
            table.append(line)
            continue
        if table:
            if not table[0].startswith(NOT_FIGURES) and any(re.search(r"\d", row) for row in table[2:]):
                outside.append(table[0])
            table = []
    assert not outside, f"tables of figures outside <!-- table: ... --> markers: {outside}"


def test_a_changed_figure_is_caught(tmp_path):
    rt = readme_tables()
    text = README.read_text()
    block = rt.BLOCK.search(text)
    old = block.group(5)
    tampered = text.replace(old, old.replace("|", "| 1", 1), 1)
    assert rt.render(tampered)[1] == [block.group(2)]
