"""The demo's fine-tunes resume from a checkpoint: interrupted (a kill between saves, or
Ctrl-C/SIGTERM, honoured after the step in flight) and run again, they end with the very
weights of an uninterrupted run. Tiny model, a few steps."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from examples import demo
from examples.common import pack_examples
from tests.conftest import VOCAB, make_model

STEPS = 6


def _batches(rng: random.Random, interrupt_at=None, action=None):
    calls = {"n": 0}

    def make():
        if interrupt_at is not None and calls["n"] == interrupt_at:
            action()
        calls["n"] += 1
        rows = [([rng.randrange(3, VOCAB) for _ in range(5)], [rng.randrange(3, VOCAB) for _ in range(3)])
                for _ in range(4)]
        return pack_examples(rows, 0)

    return make


def _run(tmp_path, interrupt_at=None, action=None, note=None, save_every_s=0.0):
    model = make_model("llama", seed=0)
    rng = random.Random(5)
    losses = demo.finetune(model, _batches(rng, interrupt_at, action), STEPS, 1e-3, "tiny",
                           seed=3, rng=rng, checkpoint=tmp_path / "ck" / "tiny.pt",
                           note=note or {"model": "tiny", "steps": STEPS},
                           save_every_s=save_every_s)
    return model, losses


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_killed_fine_tune_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, straight_losses = _run(tmp_path / "straight")
    assert not (tmp_path / "straight" / "ck" / "tiny.pt").exists()  # removed when done

    def killed():
        raise RuntimeError("killed")  # as a kill between two steps: no chance to save

    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, interrupt_at=4, action=killed)
    saved = torch.load(tmp_path / "ck" / "tiny.pt", weights_only=False)
    assert saved["step"] == 4  # saved after every step (save_every_s=0)
    resumed, losses = _run(tmp_path)
    assert _same(resumed, straight) and losses == straight_losses
    assert not (tmp_path / "ck" / "tiny.pt").exists()
    assert not _same(resumed, make_model("llama", seed=0))  # it trained


def test_ctrl_c_saves_after_the_step_in_flight_and_resumes(tmp_path):
    straight, _ = _run(tmp_path / "straight", save_every_s=1e9)
    with pytest.raises(KeyboardInterrupt, match="resume from step 3"):
        _run(tmp_path, interrupt_at=2, action=lambda: os.kill(os.getpid(), signal.SIGINT),
             save_every_s=1e9)
    assert torch.load(tmp_path / "ck" / "tiny.pt", weights_only=False)["step"] == 3
    resumed, _ = _run(tmp_path, save_every_s=1e9)
    assert _same(resumed, straight)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    with pytest.raises(RuntimeError):
        _run(tmp_path, interrupt_at=3, action=lambda: (_ for _ in ()).throw(RuntimeError("x")))
    straight, _ = _run(tmp_path / "straight", note={"model": "tiny", "steps": STEPS, "lr": 2})
    other, _ = _run(tmp_path, note={"model": "tiny", "steps": STEPS, "lr": 2})
    assert _same(other, straight)  # started over: the stale checkpoint was dropped


def _doc_rows(text: str):
    """The demo's full table (target | method | accuracy | KL | time) as rows."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1] in demo.METHODS:
            rows.append({"target": cells[0], "method": cells[1], "accuracy": float(cells[2]),
                         "kl_to_skill": float(cells[3])})
    return rows


def test_readme_table_is_what_the_demo_prints_for_its_documented_run():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = _doc_rows((root / "docs" / "demo-results.md").read_text())
    assert len(rows) == len(demo.TARGETS) * len(demo.METHODS)
    assert demo.condensed_table(rows) in (root / "README.md").read_text()


def test_the_demo_ends_by_saying_where_everything_is(tmp_path):
    text = demo.where_everything_is(tmp_path, tmp_path / "merges", tmp_path / "report", False)
    assert f"{tmp_path / 'merges' / demo.KEPT_MERGE}/" in text and "model card" in text
    assert f"{tmp_path / 'report'}/" in text and "results.md" in text
    assert demo.KEPT_MERGE == "sibling-scrambled--aligned"  # the README names this folder
