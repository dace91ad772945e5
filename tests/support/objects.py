"""Objects under a URI (or a local folder), through plad-ray's own pyarrow filesystems (plad_ray.data.storage)."""

import pyarrow.fs as pafs

from plad_ray.data import storage


def listing(uri: str) -> set[str]:
    """Every object under `uri`, relative to it."""
    fs, path = storage.filesystem_and_path(uri)
    return {
        i.path[len(path) + 1 :]
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File
    }


def read_object(uri: str) -> bytes:
    fs, path = storage.filesystem_and_path(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
