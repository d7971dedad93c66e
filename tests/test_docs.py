"""The docs a user reads point only at files the project holds."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve_inside_the_project():
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
    checked = 0
    for doc in docs:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{doc.name} links outside the project: {target}"
            assert path.exists(), f"{doc.name} links to a missing file: {target}"
            checked += 1
    assert checked >= 3  # the reference page and the pictures


def test_reference_page_marks_every_deviation_option():
    text = (ROOT / "docs" / "reference.md").read_text()
    for option in ("model.bn_stats=joint", "model.dtype=bfloat16", "data.normalization=imagenet",
                   "data.stain.method", "data.stain_augment.method", "data.shared_geometry"):
        row = next(line for line in text.splitlines() if option in line and line.startswith("|"))
        assert "**deviation**" in row, row
