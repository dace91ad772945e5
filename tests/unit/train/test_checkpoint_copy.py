"""A checkpoint in storage, read by a rank: Ray's shared download folder can vanish under a waiting rank (another
rank of the node deleting it after use); the rank asks again and downloads it itself. Other errors pass through."""

from contextlib import contextmanager

import pytest

from plad_ray.train.checkpoints import local_copy

RACE = (
    "Checkpoint directory /tmp/checkpoint_tmp_d9 does not exist, even though it should have been created by another "
    "process. Please raise an issue on GitHub: https://github.com/ray-project/ray/issues"
)


class Checkpoint:
    """as_directory() as Ray's: raises `errors` in turn at entry, then yields the folder; counts entries and exits."""

    def __init__(self, folder, errors):
        self.folder, self.errors, self.entered, self.exited = folder, list(errors), 0, 0

    @contextmanager
    def as_directory(self):
        self.entered += 1
        if self.errors:
            raise self.errors.pop(0)
        try:
            yield self.folder
        finally:
            self.exited += 1


def test_the_cleanup_race_is_asked_again_and_the_folder_released_after_use(tmp_path, capsys):
    checkpoint = Checkpoint(str(tmp_path), [RuntimeError(RACE)])
    with local_copy(checkpoint) as folder:
        assert folder == str(tmp_path) and checkpoint.exited == 0
    assert (checkpoint.entered, checkpoint.exited) == (2, 1)
    assert "downloading again" in capsys.readouterr().out


def test_no_race_one_call_and_other_errors_pass_through(tmp_path):
    checkpoint = Checkpoint(str(tmp_path), [])
    with local_copy(checkpoint) as folder:
        assert folder == str(tmp_path)
    assert (checkpoint.entered, checkpoint.exited) == (1, 1)
    for error in (RuntimeError("disk full"), OSError("no such bucket")):
        with pytest.raises(type(error), match=str(error)):
            with local_copy(Checkpoint(str(tmp_path), [error])):
                pass
    twice = Checkpoint(str(tmp_path), [RuntimeError(RACE), RuntimeError(RACE)])  # asked once more, not forever
    with pytest.raises(RuntimeError, match="even though"):
        with local_copy(twice):
            pass
    assert twice.entered == 2
