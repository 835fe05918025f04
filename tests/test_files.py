"""Staged outputs (qlora.files): published whole, with the modes an ordinary open() gives."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from qlora.files import staged_dir, staged_file


@pytest.fixture
def umask_022():
    """The usual umask, whatever the test runner's: files should come out 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staged_dir_gives_its_files_ordinary_modes(tmp_path, umask_022):
    """safetensors' save_file makes its files 0600; the published folder's files are 0644,
    at any depth, like those written with open()."""
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "trainable.safetensors"))
        (tmp / "config.json").write_text("{}")
    for name in ("model.safetensors", "sub/trainable.safetensors", "config.json"):
        assert mode(final / name) == 0o644, name
    assert mode(final) == mode(final / "sub") == 0o755


def test_staged_file_gives_ordinary_mode_to_a_file_its_writer_replaced(tmp_path, umask_022):
    final = tmp_path / "model.safetensors"
    with staged_file(final) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # replaces mkstemp's file with its own
    assert mode(final) == 0o644
