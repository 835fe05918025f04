"""The demo, fast variant: a few steps, a few held-out words; it runs and writes its outputs.
(The full demo's figures, held-out accuracy before and after, are measured by `qlora demo`.)"""

import json

from qlora.cli import main


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
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "interrupted at step 1 of 3" in err and "Traceback" not in err
