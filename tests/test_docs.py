"""The repository's references to its own files resolve (fast: no services, no training).

What is scanned: every text file git knows in this checkout (`git ls-files --cached --others
--exclude-standard`: tracked files plus new, not yet committed, not ignored ones) whose name is
*.py, *.yaml, *.yml, *.md, *.sh, *.toml or Makefile.

Rule for a path mentioned in text ("a reference"):
1. It starts with one of the source-tree folders SOURCE_DIRS (docs/, suite/, baselines/,
   launchers/, configs/, scripts/, tests/, reports/) at a word boundary: not preceded by a
   letter, digit, '.', '/' or '-', so `runs/paper/suite/x`, `../suite/x`, `$OUT/reports/x` and
   URLs are not references. Folders that only hold run output (runs/, data/, weights/, mlruns/)
   are never checked.
2. Placeholders are not concrete paths and are skipped: a reference containing any of
   < > { } [ ] * ? $ % | or "..." (`reports/<name>`, `baselines/<family>.py`,
   f"configs/{name}.yaml", `tests/test_*.py`, `runs/...`).
3. Trailing punctuation is dropped (`.`, `,`, `:`, `;`, `)`, `]`, quotes, backticks), and so are a
   `:LINE` suffix and a pytest `::test_name` suffix.
4. reports/ holds both code and generated reports. A reference below reports/ whose first
   component is neither a file nor a folder with files in the source tree (`reports/demo`,
   `reports/demo/index.html`, `reports/imagenet_resnet50`) is an output path of `hfbench report`
   and is skipped; `reports/build.py` and `reports/fmnist_seeds/report.md` are checked.
5. A reference with a file extension must be an existing file; one without (a folder such as
   `configs/paper/`, or an extensionless script) must exist as a file or a folder. Existence is
   checked in the working tree, so a fresh clone (CI) checks against what is committed.
6. In Markdown files, relative link targets `[text](target)` (not URLs, not `#anchors`, not
   placeholders) are resolved against the Markdown file's own folder and must exist.
Also checked:
- every citation "hyperflux.md section N" / "sections N-M" / "sections N and M" names numbered
  headings ("## N. Title") that exist in docs/hyperflux.md;
- every quoted section title after baselines.md (`docs/baselines.md "Other L0 methods"`,
  `baselines.md, "Marchenko-Pastur (random-matrix) pruning"`) is a heading of docs/baselines.md
  (compared without a leading "N." number);
- no text file git knows mentions the background-material folder outside the repository
  (the parent folder's "shared", written here only in pieces so this file does not match).
A failure lists file:line and the missing target for every broken reference.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("docs", "suite", "baselines", "launchers", "configs", "scripts", "tests", "reports")
SCANNED_SUFFIXES = (".py", ".yaml", ".yml", ".md", ".sh", ".toml")
SCANNED_NAMES = ("Makefile",)
PLACEHOLDER = re.compile(r"[<>{}\[\]*?$%|]|\.\.\.")
# a reference: a source folder at a word boundary, then anything up to whitespace or a delimiter
REF = re.compile(r"(?<![\w./-])((?:" + "|".join(SOURCE_DIRS) + r")/[^\s`'\"()]*)")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SECTION_CITE = re.compile(
    r"hyperflux\.md[,:]?\s+(?:#\s*)?sections?\s+(\d+(?:\s*(?:-|–|,|and|to)\s*\d+)*)", re.IGNORECASE
)
TITLE_CITE = re.compile(r"baselines\.md[,:]?\s+(?:#\s*)?[\"“]([^\"”\n]+)[\"”]")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# the forbidden spellings, assembled so that this file itself does not contain them
FORBIDDEN = ("../" + "shared", "/work/" + "shared")


# ----------------------------------------------------------------------------- file lists
def git_files(root: Path = ROOT) -> list[str]:
    """Files git knows here (tracked, plus untracked files that are not ignored)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return sorted({p for p in out.decode("utf-8", "replace").split("\0") if p})


def scanned(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(SCANNED_SUFFIXES) or Path(f).name in SCANNED_NAMES]


def read_text(root: Path, rel: str) -> str | None:
    p = root / rel
    if not p.is_file():  # deleted in the working tree, or a submodule
        return None
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# ----------------------------------------------------------------------------- the scanner
def _clean(ref: str) -> str:
    ref = re.sub(r"::.*$", "", ref)  # pytest node id
    ref = ref.rstrip(".,;:!`'\")]")
    ref = re.sub(r":\d+(?::\d+)?$", "", ref)  # file:LINE[:COL]
    return ref.rstrip(".,;:!`'\")]")


def report_sources(files: list[str]) -> set[str]:
    """Names directly below reports/ that belong to the source tree (files, or folders with files)."""
    return {f.split("/")[1] for f in files if f.startswith("reports/")}


def check_reference(ref: str, root: Path, report_parts: set[str]) -> str | None:
    """The cleaned reference if it is concrete and missing, else None (exists or not checked)."""
    ref = _clean(ref)
    if PLACEHOLDER.search(ref):
        return None
    parts = [p for p in ref.split("/") if p]
    if len(parts) < 2:
        return None  # a bare source folder ("docs/", "tests/")
    if parts[0] == "reports" and parts[1] not in report_parts:
        return None  # an output folder of `hfbench report` (reports/demo, reports/<experiment>)
    target = root / ref
    if Path(parts[-1]).suffix and not ref.endswith("/"):
        return None if target.is_file() else ref
    return None if target.exists() else ref


def scan_text(text: str, rel: str, root: Path, report_parts: set[str]) -> list[tuple[int, str]]:
    """(line, missing target) for every broken file reference in `text` (file `rel`)."""
    bad: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        missing = set()
        for m in REF.finditer(line):
            miss = check_reference(m.group(1), root, report_parts)
            if miss is not None and (root / miss).resolve() not in missing:  # once per line
                bad.append((lineno, miss))
                missing.add((root / miss).resolve())
        if rel.endswith(".md"):
            for m in MD_LINK.finditer(line):
                target = m.group(1).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or PLACEHOLDER.search(target):
                    continue  # anchor only, URL / mailto, placeholder
                base = root if target.startswith("/") else (root / rel).parent
                path = (base / target.lstrip("/")).resolve()
                if not path.exists() and path not in missing:  # not already reported by the rule above
                    bad.append((lineno, f"{target} (link, relative to {Path(rel).parent.as_posix() or '.'})"))
    return bad


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _numbers(spec: str) -> list[int]:
    """'1-6' -> 1..6, '5 and 7' -> [5, 7], '3, 4' -> [3, 4]."""
    out: list[int] = []
    for a, b in re.findall(r"(\d+)(?:\s*(?:-|–|to)\s*(\d+))?", spec):
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def headings(text: str) -> list[str]:
    return [h.strip() for h in HEADING.findall(text)]


def numbered_sections(text: str) -> set[int]:
    return {int(m.group(1)) for h in headings(text) if (m := re.match(r"(\d+)\.?\s", h))}


def section_titles(text: str) -> set[str]:
    return {re.sub(r"^\d+\.?\s+", "", h).strip() for h in headings(text)}


def scan_citations(text: str, hf_sections: set[int], bl_titles: set[str]) -> list[tuple[int, str]]:
    bad: list[tuple[int, str]] = []
    for m in SECTION_CITE.finditer(text):
        for n in _numbers(m.group(1)):
            if n not in hf_sections:
                bad.append((_line_of(text, m.start()), f"docs/hyperflux.md section {n}"))
    for m in TITLE_CITE.finditer(text):
        title = m.group(1).strip()
        if title not in bl_titles:
            bad.append((_line_of(text, m.start()), f'docs/baselines.md section "{title}"'))
    return bad


def _fmt(bad: list[str]) -> str:
    return "\n".join(bad)


# ----------------------------------------------------------------------------- the repository
def test_file_references_resolve():
    files = git_files()
    parts = report_sources(files)
    bad = []
    for rel in scanned(files):
        text = read_text(ROOT, rel)
        if text is None:
            continue
        bad += [f"{rel}:{ln}: {target}" for ln, target in scan_text(text, rel, ROOT, parts)]
    assert not bad, f"{len(bad)} reference(s) to files that do not exist:\n{_fmt(bad)}"


def test_doc_section_citations_exist():
    hf = read_text(ROOT, "docs/hyperflux.md")
    bl = read_text(ROOT, "docs/baselines.md")
    assert hf is not None and bl is not None, "docs/hyperflux.md and docs/baselines.md must exist"
    hf_sections, bl_titles = numbered_sections(hf), section_titles(bl)
    assert hf_sections, "docs/hyperflux.md has no numbered sections ('## N. Title')"
    bad = []
    for rel in scanned(git_files()):
        text = read_text(ROOT, rel)
        if text is None:
            continue
        bad += [f"{rel}:{ln}: {what}" for ln, what in scan_citations(text, hf_sections, bl_titles)]
    assert not bad, f"{len(bad)} citation(s) of doc sections that do not exist:\n{_fmt(bad)}"


def test_hyperflux_doc_numbering_is_contiguous():
    """Sections are cited by number: 1..K with no gap or duplicate."""
    hf = read_text(ROOT, "docs/hyperflux.md")
    assert hf is not None
    nums = [int(m.group(1)) for h in headings(hf) if (m := re.match(r"(\d+)\.?\s", h))]
    assert nums == list(range(1, len(nums) + 1)), nums


def test_no_reference_to_material_outside_the_repository():
    bad = []
    for rel in git_files():
        text = read_text(ROOT, rel)
        if text is None:
            continue
        for ln, line in enumerate(text.splitlines(), 1):
            for word in FORBIDDEN:
                if word in line:
                    bad.append(f"{rel}:{ln}: {word}")
    assert not bad, "the repository must not point outside itself:\n" + _fmt(bad)


# ----------------------------------------------------------------------------- the scanner itself
# Paths and citations in these tests are assembled from pieces, so that the repository scan above
# does not read them as references of this file.
D, S, C, R = "docs", "suite", "configs", "reports"
HF, BL = "hyperflux" + ".md", "baselines" + ".md"


def _tree(tmp_path: Path) -> Path:
    for rel in (f"{D}/present.md", f"{S}/a.py", f"{R}/build.py", f"{R}/kept/report.md", f"{C}/paper/x.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    return tmp_path


def test_scanner_finds_the_one_missing_path(tmp_path):
    root = _tree(tmp_path)
    text = "\n".join(
        [
            f"see {D}/present.md, section 2.",  # exists
            f"see `{S}/a.py:12` and {S}/a.py::test_x",  # exists, with line / node-id suffixes
            f"{C}/paper/ and {C}/paper/x.yaml",  # a folder and a file that exist
            f"the method notes are in {D}/absent.md.",  # line 4: missing
            f"{S}/<name>.py, {C}/{{name}}.yaml, tests/test_*.py, runs/x/{S}/b.py",  # placeholders, not refs
            f"{R}/demo/index.html and {R}/<experiment>",  # output paths of `hfbench report`
            f"https://example.org/{D}/absent.md",  # a URL
        ]
    )
    assert scan_text(text, "README.md", root, {"build.py", "kept"}) == [(4, f"{D}/absent.md")]


def test_scanner_checks_report_sources_and_markdown_links(tmp_path):
    root = _tree(tmp_path)
    text = f"{R}/kept/report.md {R}/kept/gone.md [a](present.md) [b](nope.md#x) [c](#top) [d](https://x.org/y)"
    bad = scan_text(text, f"{D}/index.md", root, {"build.py", "kept"})
    assert [t for _, t in bad] == [f"{R}/kept/gone.md", "nope.md (link, relative to docs)"]


def test_scanner_reports_a_broken_link_once(tmp_path):
    root = _tree(tmp_path)
    text = f"[{D}/present.md]({D}/present.md)\n[{D}/gone.md]({D}/gone.md)"
    assert scan_text(text, "README.md", root, set()) == [(2, f"{D}/gone.md")]


def test_citation_scanner():
    hf = "# T\n## 1. One\n## 2. Two\n## 3. Three\n"
    bl = "# B\n## Other L0 methods\n## 2. Magnitude\n"
    text = (
        f'{HF} sections 1-3\n"""{D}/{HF} section 4"""\n{HF} sections 2 and 5\n'
        f'{D}/{BL} "Other L0 methods"\n{BL}, "Magnitude"\n{BL} "Nope"\n# {HF}\n# section 3\n'
    )
    bad = scan_citations(text, numbered_sections(hf), section_titles(bl))
    assert bad == [(2, f"{D}/{HF} section 4"), (3, f"{D}/{HF} section 5"), (6, f'{D}/{BL} section "Nope"')]
    assert _numbers("1-6") == [1, 2, 3, 4, 5, 6] and _numbers("5 and 7") == [5, 7]


def test_every_test_the_reliability_table_names_exists_and_the_table_lists_every_promise():
    """tests/reliability.py maps each promise to node-id prefixes; a prefix that matches no test
    function (renamed, deleted) would silently drop tests from the table."""
    import ast

    from tests.reliability import PROMISES

    ids = []
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                ids.append(f"tests/{f.name}::{node.name}")
    for promise, where, prefixes in PROMISES:
        assert (ROOT / where).is_file(), (promise, where)
        for p in prefixes:
            assert any(i.startswith(p) for i in ids), f"no test matches {p!r} ({promise})"
    doc = (ROOT / "docs/reliability.md").read_text()
    for promise, _, _ in PROMISES:
        assert f"| {promise} |" in doc, f"docs/reliability.md lacks: {promise} (run make test)"
