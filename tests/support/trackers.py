"""Reading what the trackers wrote: the test secrets they must never print, and W&B's offline run files (its
records decoded without the wandb package's reader)."""

import glob
import json
import struct

SECRET_TOKEN = "mlflow-token-do-not-print-7f3a"
SECRET_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 characters


def wandb_records(path: str) -> list:
    """The records of a W&B transaction log (run-<id>.wandb): W&B's LevelDB-style log of protobuf Records,
    a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_items(folder, kind: str) -> list[dict]:
    """Every `history` row (or `summary` update) of every offline W&B run under `folder` (wandb/offline-run-*)."""
    out = []
    for path in sorted(glob.glob(f"{folder}/wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == kind:
                items = record.history.item if kind == "history" else record.summary.update
                out.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return out


def wandb_history(folder) -> list[dict]:
    return _wandb_items(folder, "history")


def wandb_summaries(folder) -> dict:
    return {key: value for update in _wandb_items(folder, "summary") for key, value in update.items()}
