"""Helpers for fault tests: processes of one job's local Ray cluster, and synthetic pairs."""

import os
import random
import signal
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from plad_ray import pairs
from plad_ray.generate.schemas import PAIR_SCHEMA
from plad_ray.models import tiny


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (a job's driver starts its local Ray cluster as its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def find_in(pid: int, marker: str) -> bool:
    """The process's command line contains `marker`."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def find(pid: int, marker: str) -> list[int]:
    """Descendants of `pid` whose command line contains `marker` (Ray names actors ray::<Class>)."""
    return [child for child in descendants(pid) if find_in(child, marker)]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_pairs(output_dir: Path, num_pairs: int, heldout_fraction: float = 0.1, seed: int = 0) -> None:
    """A pairs dataset of the tiny task (for train.pairs): chosen = the right reversal, rejected = a wrong one."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_pairs):
        prompt, answer = tiny.reversal_example(rng)
        wrong = "".join(rng.choice(string.ascii_lowercase) for _ in range(len(answer)))
        rows.append(
            {
                "id": f"s{i:06d}",
                "sample_index": 0,
                "prompt": prompt,
                "chosen": answer,
                "rejected": wrong,
                "chosen_num_tokens": len(answer) + 1,
                "rejected_num_tokens": len(wrong) + 1,
                "chosen_finish_reason": "eos",
                "rejected_finish_reason": "eos",
                "teacher_model": "synthetic",
                "student_model": "synthetic",
                "teacher_sampling": "{}",
                "student_sampling": "{}",
                "heldout": pairs.is_heldout(f"s{i:06d}", heldout_fraction),
            }
        )
    folder = output_dir / "pairs"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), folder / "part-0.parquet")
