"""The object-storage pieces on their own, against the S3 server on loopback (seconds, no Ray): publishing a folder
file by file, and fetching a model folder to the local cache once, again only when it changed."""

import json
import os

import pytest
from support.objects import listing

from plad_ray.data import storage
from plad_ray.errors import DataError
from plad_ray.models.cache import DONE, cache_folder, local_model


def write_folder(folder, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_publish_copies_file_by_file_and_writes_the_manifest_last(s3_server, tmp_path):
    # An S3 "folder" cannot be moved (pyarrow: "AWS Error NO_SUCH_KEY during CopyObject"): the old export path
    # moved a whole .partial-* folder into place, and failed there.
    uri = s3_server.bucket("plad-publish") + "/run/student"
    write_folder(tmp_path / "one", {"config.json": "{}", "model.safetensors": "weights-1", "extra.txt": "x"})
    storage.publish(str(tmp_path / "one"), uri, {"steps": 1})
    assert listing(uri) == {"config.json", "model.safetensors", "extra.txt", "_manifest.json"}
    assert storage.manifest(uri) == {"steps": 1}
    # A second export replaces the first whole: no file of the old one stays beside the new one.
    write_folder(tmp_path / "two", {"config.json": "{}", "model.safetensors": "weights-2"})
    storage.publish(str(tmp_path / "two"), uri, {"steps": 2})
    assert listing(uri) == {"config.json", "model.safetensors", "_manifest.json"}
    assert storage.manifest(uri) == {"steps": 2}
    assert not [o for o in listing(s3_server.bucket("plad-publish")) if ".partial" in o]


def test_a_model_on_object_storage_is_fetched_once_and_again_when_it_changes(s3_server, tmp_path):
    bucket = s3_server.bucket("plad-models")
    uri = f"{bucket}/models/student"
    write_folder(
        tmp_path / "model",
        {
            "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}),
            "model.safetensors": "weights-1",
            "tokenizer.json": "{}",
        },
    )
    storage.copy_local_dir(str(tmp_path / "model"), uri)
    cache = str(tmp_path / "cache")
    local = local_model(uri, cache)
    assert os.path.dirname(local) == cache and os.path.basename(local).startswith("student-")
    assert (tmp_path / "cache" / os.path.basename(local) / "model.safetensors").read_text() == "weights-1"
    assert os.path.isfile(os.path.join(local, DONE))
    stamp = os.stat(os.path.join(local, "model.safetensors")).st_mtime_ns
    assert local_model(uri, cache) == local  # unchanged: the same copy, not fetched again
    assert os.stat(os.path.join(local, "model.safetensors")).st_mtime_ns == stamp
    # A model card written into it (a run does so after evaluating an export): the weights are the same copy.
    storage.write_text(f"{uri}/README.md", "# Student distilled with plad-ray")
    assert local_model(uri, cache) == local
    # Rewritten under the same URI (a new export): another copy, with the new weights.
    storage.write_text(f"{uri}/model.safetensors", "weights-2-longer")
    again = local_model(uri, cache)
    assert again != local and open(os.path.join(again, "model.safetensors")).read() == "weights-2-longer"
    assert cache_folder(uri, cache) == again
    # Local paths and file:// URIs are opened where they are.
    assert local_model(str(tmp_path / "model"), cache) == str(tmp_path / "model")
    assert local_model(f"file://{tmp_path / 'model'}", cache) == str(tmp_path / "model")
    with pytest.raises(DataError, match=f"model folder {bucket}/models/nothing: not found or empty"):
        local_model(f"{bucket}/models/nothing", cache)


def test_a_model_folder_given_as_a_uri_is_checked_after_it_is_fetched(s3_server, tmp_path):
    from plad_ray.models.folders import resolve_model

    uri = s3_server.bucket("plad-models-2") + "/student"
    write_folder(
        tmp_path / "model",
        {
            "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}),
            "tokenizer.json": "{}",
            "model.bin": "pickle",
        },
    )
    storage.copy_local_dir(str(tmp_path / "model"), uri)
    with pytest.raises(DataError, match=f"config key student.model: {uri} has only pickle"):
        resolve_model(uri, "student.model", log=lambda _: None, cache_root=str(tmp_path / "cache"))
