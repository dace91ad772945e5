"""Every figure the README quotes beside a result file is in that file: a README that names
`benchmarks/results/<run>.json` (or `.{json,md}`) for a paragraph or the table after it must not quote a 3-decimal
figure (accuracy, ECE, ...) that the run's files do not hold."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT = re.compile(r"benchmarks/results/([\w.-]+?)(?:\.\{json,md\}|\.json|\.md)")
FIGURE = re.compile(r"(?<![\d.])[01]\.\d{3}(?![\d])")


def quoted_blocks(text: str) -> list[tuple[list[str], str]]:
    """(result stems, text) for each README paragraph naming a result file, with the table that follows it."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    out = []
    for i, block in enumerate(blocks):
        stems = RESULT.findall(block)
        if stems:
            following = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1].lstrip().startswith("|") else ""
            out.append((stems, block + "\n" + following))
    return out


def result_text(stem: str) -> str:
    files = [ROOT / "benchmarks" / "results" / f"{stem}.{ext}" for ext in ("md", "json")]
    assert any(f.is_file() for f in files), f"README names benchmarks/results/{stem}, which does not exist"
    return "\n".join(f.read_text() for f in files if f.is_file())


def test_every_figure_quoted_beside_a_result_file_is_in_it():
    blocks = quoted_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README names no result file"
    missing = []
    for stems, block in blocks:
        held = "\n".join(result_text(s) for s in stems)
        missing += [(stems, f) for f in FIGURE.findall(block) if f not in held]
    assert not missing, missing


def test_the_check_catches_a_figure_that_is_not_in_the_file():
    text = "Newest run (`benchmarks/results/quality-20261203-233224.json`): SeqKD 0.557, PLaD 0.999.\n"
    ((stems, block),) = quoted_blocks(text)
    held = result_text(stems[0])
    assert [f for f in FIGURE.findall(block) if f not in held] == ["0.999"]
