"""The documentation cannot drift from the code: generated tables cover the whole data model,
every page placeholder is known, and every link from the code into docs/ lands on a heading.

The site itself is built by ``nox -s docs`` (mkdocs in strict mode); these tests need only the
repository and jasper-core.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("jasper_docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def test_array_table_lists_every_array_of_the_schema():
    from jasper.schema import ARRAYS

    table = hooks.TABLES["arrays"]()
    names = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert names == list(ARRAYS)
    for spec in ARRAYS.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{spec.name}` |"))
        for dtype in spec.dtypes:
            assert dtype in row, (spec.name, dtype)


def test_array_table_states_every_index_rule():
    from jasper.schema import ARRAYS

    table = hooks.TABLES["arrays"]()
    for spec in ARRAYS.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{spec.name}` |"))
        for ref in spec.references:
            assert (f"`{ref}`" in row) or ("N_p" in row), (spec.name, ref)
        if spec.quality_range:
            assert "validate --strict" in row, spec.name


def test_default_steps_table_is_the_code_s_table():
    from jasper.curriculum import DEFAULT_STEPS

    table = hooks.TABLES["default_steps"]()
    rows = table.splitlines()[2:]
    assert len(rows) == len(DEFAULT_STEPS)
    assert rows[0].startswith("| 0-9 |") and "and later" in rows[-1]
    for row, (_, probs) in zip(rows, DEFAULT_STEPS):
        assert [float(c) for c in row.strip("| ").split(" | ")[1:]] == list(probs)


def test_batch_table_fails_when_a_key_is_undocumented(monkeypatch):
    from jasper.dataset import BATCH_KEYS

    assert [line.split("`")[1] for line in hooks.TABLES["batch_keys"]().splitlines()[2:]] == \
        list(BATCH_KEYS)
    monkeypatch.delitem(hooks.BATCH_CONTENT, "steering")
    with pytest.raises(ValueError, match=r"undocumented \['steering'\]"):
        hooks.TABLES["batch_keys"]()


def test_every_placeholder_in_the_pages_is_known():
    for page in DOCS.rglob("*.md"):
        for name, arg in hooks.MARKER.findall(page.read_text()):
            assert name in hooks.TABLES or (name == "include" and arg) or name == "changelogs", \
                (page, name)
            hooks.on_page_markdown(f"<!-- jasper:{name}{' ' + arg if arg else ''} -->",
                                   page=None, config=None, files=None)


def test_unknown_placeholder_fails():
    class Page:
        class file:
            src_uri = "x.md"

    with pytest.raises(ValueError, match="unknown generated content"):
        hooks.on_page_markdown("<!-- jasper:nope -->", page=Page, config=None, files=None)


def test_include_demotes_headings_outside_code_fences_only():
    text = "# Title\n\n```bash\n# a shell comment\n```\n\n## Section\n"
    assert hooks.demote(text) == "## Title\n\n```bash\n# a shell comment\n```\n\n### Section\n"
    with pytest.raises(FileNotFoundError):
        hooks.include("../outside.md")


def test_changelogs_include_every_package():
    text = hooks.changelogs()
    packages = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
    for name in packages:
        assert f"\n## {name}\n" in f"\n{text}", name
        assert (ROOT / "packages" / name / "CHANGELOG.md").is_file(), name
    assert text.startswith("## jasper-core\n")


def test_the_published_benchmark_run_has_its_charts():
    run = hooks.committed_run()
    assert run.name.endswith("-committed")
    for chart in re.findall(r"\(benchmarks/([a-z_]+\.png)\)", (DOCS / "performance.md").read_text()):
        assert (run / chart).is_file(), chart


# links from code, READMEs and the noxfile into docs/, e.g. ``docs/data-model.md#negative-tiers``
_LINK = re.compile(r"docs/([a-z0-9/_-]+\.md)(?:#([a-z0-9_-]+))?")


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip())
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    anchors, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.+)$", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


def _sources():
    for base in ("packages", "benchmarks", "examples", "tests"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix in {".py", ".md"} and "results" not in path.parts and ".nox" not in path.parts:
                yield path
    yield ROOT / "README.md"
    yield ROOT / "noxfile.py"


def test_every_link_from_the_code_into_docs_lands_on_a_heading():
    checked = 0
    for path in _sources():
        if path == Path(__file__):
            continue
        for page, anchor in _LINK.findall(path.read_text(errors="replace")):
            target = DOCS / page
            assert target.is_file(), f"{path.relative_to(ROOT)} links to missing docs/{page}"
            if anchor:
                assert anchor in _anchors(target), \
                    f"{path.relative_to(ROOT)} links to docs/{page}#{anchor}, which has no such heading"
            checked += 1
    assert checked >= 20


def test_no_reference_to_documents_outside_the_repository():
    for path in _sources():
        if path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        for stale in ("DATA_MODEL", "DESIGN_NOTES", "../shared"):
            assert stale not in text, f"{path.relative_to(ROOT)} refers to {stale}"
