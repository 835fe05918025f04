"""The demo, fast variant: a few steps, a few held-out words; it runs and writes its outputs.
(The full demo's figures, held-out accuracy before and after, are measured by `qlora demo`.)"""

import json

import pytest

from qlora.cli import main
from qlora.demo import check_demo_folders, inputs_dir


class WorkBegan(Exception):
    """Raised by a stand-in for the demo's first step: the demo got past its checks."""


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's first step (building its base model) stopped with WorkBegan."""
    from qlora import tiny

    def build_tiny_model(*args, **kwargs):
        raise WorkBegan

    monkeypatch.setattr(tiny, "build_tiny_model", build_tiny_model)


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "before training" in text and "after training" in text and "reloaded adapter" in text
    # what to try next names the kept base model and the adapter; no progress bar of the model's save
    assert f"--adapter {out} 'frog -> '" in text and "Writing model shards" not in captured.err
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "summary.json", "demo.json", "run_config.yaml", "prompt_format.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "prompt_format.json").read_text())
    assert record == {"data_format": "prompt_completion", "chat_template": False,
                      "chat_template_option": None}
    figures = json.loads((out / "demo.json").read_text())
    assert figures["steps"] == 3
    assert figures["reloaded_matches"] is True
    assert figures["before"]["exact_match"] == 0.0


def test_an_interrupted_demo_says_so_and_stops(tmp_path, capsys, monkeypatch):
    """A Ctrl-C or SIGTERM during training (simulated: fit stops after one step, as a signal
    would) ends the demo with one clear line, not with a failure to reload an adapter that an
    interrupted run never wrote."""
    from qlora.train import loop

    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **k: real_fit(*a, stop_after_steps=1, **k))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "interrupted at step 1 of 3" in err and "Traceback" not in err
    # the interrupted run's folder is marked as the demo's: running the demo again replaces it
    assert (out / "demo.json").is_file()
    check_demo_folders(out)


def test_the_demo_refuses_an_out_folder_it_did_not_write(tmp_path, capsys, no_demo_work):
    """A training run and a user's file in --out are refused before any work, and kept."""
    out = tmp_path / "mywork"
    out.mkdir()
    kept = {"run_config.yaml": "model: m\n", "adapter_model.safetensors": "weights",
            "notes.txt": "mine"}
    for name, text in kept.items():
        (out / name).write_text(text)
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty" in err and "choose another --out" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == kept
    assert not inputs_dir(out).exists()


def test_the_demo_refuses_an_inputs_folder_it_did_not_write(tmp_path, capsys, no_demo_work):
    out = tmp_path / "mywork"
    inputs = inputs_dir(out)
    inputs.mkdir()
    (inputs / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{inputs}, where the demo of --out {out} keeps" in err and "choose another --out" in err
    assert (inputs / "notes.txt").read_text() == "mine"


def test_the_demo_replaces_its_own_folders_and_empty_ones(tmp_path, no_demo_work):
    """A missing or empty --out, or one a previous demo wrote (its demo.json, and beside it
    base-model/ and data/), passes the check; the previous inputs are removed as work begins."""
    check_demo_folders(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_demo_folders(tmp_path / "empty")
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("demo.json", "run_config.yaml", "adapter_model.safetensors"):
        (out / name).write_text("{}")
    for folder in ("base-model", "data"):
        (inputs_dir(out) / folder).mkdir(parents=True)
        (inputs_dir(out) / folder / "file").write_text("old")
    check_demo_folders(out)
    with pytest.raises(WorkBegan):
        main(["demo", "--out", str(out), "--steps", "1"])
    assert not inputs_dir(out).exists()
