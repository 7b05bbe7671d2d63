"""Every link and every repository path named in README.md and docs/*.md points at something that exists.

What is checked, per page:
- markdown links and images, `[text](target)` and `![alt](target)`: the target relative to the page,
  and a `#anchor` against the headings of the markdown page it names (GitHub's slug rules);
  http(s) and mailto links are not checked (no network);
- repository paths named in text or code, `minigrpo/rollout/vllm_engine.py`, `recipes/countdown_cpu.yaml`:
  tokens that start with a top-level tracked folder (TOP_DIRS) or are a top-level file (TOP_FILES),
  relative to the repository root. `file.py::test` and `file.py:function` are checked for their file
  part, a glob must match at least one file, a placeholder (`<model>`, `step-N`, `{x}`) is skipped;
- dotted module names, `minigrpo.rollout.serve`: the module (file or package) must exist; what follows a
  module may be an attribute.
Run outputs (`outputs/...`, `runs/...`, `checkpoints/...`) are not repository paths: not in TOP_DIRS.
Stdlib only, no model: it runs in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TOP_DIRS = ("minigrpo", "tests", "recipes", "benchmarks", "examples", "scripts", "docs", ".ci")
TOP_FILES = ("Makefile", "pyproject.toml")
RUN_OUTPUTS = ("outputs", "runs", "checkpoints")  # what a run writes: never a repository path

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a path token: not preceded by a path character (so `https://x/docs/y` and `a/tests/b` are not matched)
PATH = re.compile(r"(?<![\w./\-])((?:%s)/[\w./*<>{}:\-]*|(?:%s)\b)" % (
    "|".join(re.escape(d) for d in TOP_DIRS), "|".join(re.escape(f) for f in TOP_FILES)))
MODULE = re.compile(r"(?<![\w./\-])minigrpo(?:\.[A-Za-z_]\w*)+")
PLACEHOLDER = re.compile(r"<[^>]*>|\{[^}]*\}|\bstep-N\b|\.\.\.")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax reduced to its text, lower case, punctuation dropped
    (letters, digits, `_`, `-` and spaces stay), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _check_path(token: str, root: Path) -> str | None:
    """None when a repository path token is fine, else why not."""
    token = token.rstrip(".,;:)")
    if PLACEHOLDER.search(token):
        return None
    file_part = token.split("::")[0].split(":")[0]  # pytest node id, or file:function
    if any(ch in file_part for ch in "*?["):
        return None if list(root.glob(file_part.rstrip("/"))) else f"{token}: the glob matches nothing"
    return None if (root / file_part).exists() else f"{token}: no such file or folder"


def _check_module(dotted: str, root: Path) -> str | None:
    """`minigrpo.a.b.c`: at least `minigrpo/a` must be a module or package; after a module, attributes."""
    parts = dotted.split(".")[1:]
    here = root / "minigrpo"
    for i, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            return None
        else:
            return None if i > 0 else f"{dotted}: no such module"
    return None


def _check_link(target: str, page: Path, root: Path) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        return None
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"({target}): {path_part} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
        return f"({target}): no heading #{anchor} in {dest.relative_to(root)}"
    return None


def problems(text: str, page: Path, root: Path = ROOT) -> list[str]:
    """Every broken link or repository path in `text`, the contents of `page`."""
    found = []
    prose = CODE_SPAN.sub("", FENCE.sub("", text))  # links are never inside code
    for target in LINK.findall(prose):
        found.append(_check_link(target, page, root))
    for token in PATH.findall(LINK.sub("", text)):  # a link's target is checked above, once
        found.append(_check_path(token, root))
    for dotted in MODULE.findall(text):
        found.append(_check_module(dotted, root))
    return sorted({p for p in found if p})


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_paths_exist(page):
    assert not (bad := problems(page.read_text(), page)), f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


def test_there_are_pages_to_check():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1


def test_the_extractor_reports_what_is_missing(tmp_path):
    # a hand-made repository: two files, one page with a heading
    (tmp_path / "minigrpo" / "rollout").mkdir(parents=True)
    (tmp_path / "minigrpo" / "rollout" / "vllm_engine.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "gpu.md").write_text("# Running on GPUs\n\n## What ran where\n\n## What ran where\n")
    page = tmp_path / "README.md"
    text = """
See `minigrpo/rollout/vllm_engine.py` and minigrpo/rollout/missing_engine.py, and [the GPU page](docs/gpu.md#what-ran-where)
or [again](docs/gpu.md#what-ran-where-1), but not [a gone page](docs/gone.md) nor [a gone heading](docs/gpu.md#nowhere).
Run `tests/test_gone.py::test_x`; `minigrpo/rollout/vllm_engine.py:VLLMEngine` is fine, `minigrpo/*.py` matches nothing.
Skipped: outputs/run/checkpoints/step-N/model, `minigrpo/<name>.py`, [web](https://example.com/docs/gone.md),
`[not a link](nowhere.md)` inside code. Modules: minigrpo.rollout.vllm_engine.VLLMEngine, minigrpo.nowhere.
"""
    assert problems(text, page, tmp_path) == sorted([
        "(docs/gone.md): docs/gone.md does not exist",
        "(docs/gpu.md#nowhere): no heading #nowhere in docs/gpu.md",
        "minigrpo/*.py: the glob matches nothing",
        "minigrpo/rollout/missing_engine.py: no such file or folder",
        "minigrpo.nowhere: no such module",
        "tests/test_gone.py::test_x: no such file or folder",
    ])


@pytest.mark.parametrize("heading, anchor", [
    ("Running on GPUs", "running-on-gpus"),
    ("Solving, not only the format: a supervised warm-up, then GRPO", "solving-not-only-the-format-a-supervised-warm-up-then-grpo"),
    ("An earlier run: the format with a stop string (issue 8)", "an-earlier-run-the-format-with-a-stop-string-issue-8"),
    ("The GPU check: `make test-gpu`", "the-gpu-check-make-test-gpu"),
    ("LoRA (`lora_rank > 0`)", "lora-lora_rank--0"),  # '>' dropped, both spaces kept
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor
