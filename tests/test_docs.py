"""The documents say what the code and the patches are: every test and file they name exists, the patch's
counts are the patch's, and the README says which route needs the patch."""
import re
from pathlib import Path

from tests.helpers import REPO_ROOT

DOCS = [*REPO_ROOT.glob("*.md"), *(REPO_ROOT / "docs").glob("*.md"), REPO_ROOT / "patches" / "README.md",
        REPO_ROOT / "scripts" / "recipes" / "README.md"]
CODE_PATCH = REPO_ROOT / "patches" / "0001-plugin-hooks.patch"


def test_every_test_and_test_file_the_documents_name_exists():
    tests = REPO_ROOT / "tests"
    defined = {name for f in tests.glob("*.py") for name in re.findall(r"def (test_\w+)", f.read_text())}
    files = {f.stem for f in tests.glob("*.py")}
    wrong = []
    for doc in DOCS:
        text = doc.read_text()
        wrong += [(doc.name, t) for t in set(re.findall(r"\btest_\w+", text))
                  if t not in defined and t not in files and not t.endswith("_")]  # test_hook_<name>: a pattern
        wrong += [(doc.name, p) for p in set(re.findall(r"\btests/[\w/]+\.py", text)) if not (REPO_ROOT / p).is_file()]
    assert not wrong, sorted(wrong)


def _patch_counts():
    text = CODE_PATCH.read_text()
    per_file = {}
    for diff in text.split("\ndiff --git a/")[1:]:
        name = diff.split(" ", 1)[0]
        per_file[name] = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    return per_file


def test_the_patch_counts_in_the_documents_are_the_patchs():
    counts = _patch_counts()
    own = sum(n for name, n in counts.items() if name != "llava/plugins.py")  # lines in LLaVA's own files
    readme = (REPO_ROOT / "patches" / "README.md").read_text()
    row = re.search(r"\| `0001-plugin-hooks\.patch` \| `llava/plugins\.py` \(new, (\d+)\), `llava/train/train\.py` "
                    r"\(\+(\d+)\), `llava/model/multimodal_encoder/builder\.py` \(\+(\d+)\) \| (\d+) added, 0 removed \|",
                    readme)
    assert row, "patches/README.md: the table row of 0001-plugin-hooks.patch"
    assert [int(g) for g in row.groups()] == [counts["llava/plugins.py"], counts["llava/train/train.py"],
                                              counts["llava/model/multimodal_encoder/builder.py"], sum(counts.values())]
    for doc, pattern in ((readme, r"LLaVA's own files change by (\d+) lines"),
                         (readme, r"and (\d+) lines in LLaVA's own files"),
                         ((REPO_ROOT / "INTEGRATION.md").read_text(), r"and (\d+) lines in LLaVA's own files")):
        found = re.findall(pattern, doc)
        assert found and {int(n) for n in found} == {own}, (pattern, found, own)


def test_the_readme_says_which_route_needs_the_patch():
    readme = (REPO_ROOT / "README.md").read_text()
    intro = readme.split("## Quick start", 1)[0]
    # LLaVA's own scripts take the flag only once patches/ is applied; the entry module takes it on any LLaVA
    assert re.search(r"apply\s+`patches/`\s+to\s+LLaVA\s+and\s+add\s+that\s+flag\s+to\s+LLaVA's\s+own", intro)
    usage = readme.split("## Use it in LLaVA training", 1)[1].split("\n## ", 1)[0]
    assert "Only with `patches/` applied to LLaVA does LLaVA's own entry take the flag" in usage
