"""A minimal run config written to a file, for tests of config loading and of what a config makes a stage do."""

MINIMAL = """
output_dir: out
data: {prompts: p.jsonl}
teacher: {model: tiny:teacher}
student: {model: tiny:student}
"""


def write(tmp_path, text: str) -> str:
    """`text` as tmp_path/run.yaml; its path."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)
