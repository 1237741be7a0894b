"""The paper-analog benchmark's toy world and a smoke run of its pipeline (tiny schedules).

The benchmark's numbers live in docs/paper-analog.md; here we only check that the pipeline
the regeneration command runs still works, and that its plain baseline is what it claims.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import toyworld as tw  # noqa: E402


def test_toy_tokenizer_matches_training_ids(tmp_path):
    """Activation alignment tokenizes calibration text with the saved tokenizer: the ids must
    be the ones the models were trained on."""
    tok = tw.save_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    world = tw.World()
    import random

    rng = random.Random(0)
    texts = [world.sentence(rng), world.number_run(rng)] + [
        "".join(tw.task_example(t, rng)) for t in tw.TASKS]
    for t in texts:
        assert loaded(t)["input_ids"] == tok(t)["input_ids"] == [tw.BOS] + tw.encode(t)
    assert tw.decode(tw.encode(texts[0])) == texts[0]


def test_toy_tasks_and_scorer():
    assert tw.task_example("add", __import__("random").Random(3))[1].strip(" .").isdigit()
    held = tw.held_out("rev", 50)
    assert len({p for p, _ in held}) == 50
    assert all(c.strip(" .") == p.split()[1][::-1] for p, c in held)

    class Oracle(torch.nn.Module):  # predicts each example's completion exactly
        def __init__(self, examples):
            super().__init__()
            self.answers = {tuple([tw.BOS] + tw.encode(p)): tw.encode(c) + [tw.EOS]
                            for p, c in examples}

        def forward(self, input_ids):
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(tw.VOCAB))
            for i, row in enumerate(input_ids.tolist()):
                for n in range(1, len(row) + 1):
                    if tuple(row[:n]) in self.answers:
                        done = len(row) - n
                        logits[i, -1, self.answers[tuple(row[:n])][done]] = 1.0
            return type("Out", (), {"logits": logits})

    assert tw.accuracy(Oracle(held), held) == 1.0
    assert tw.accuracy(Oracle(held[:25]), held) == 0.5


@pytest.mark.filterwarnings("ignore")
def test_paper_analog_pipeline_smoke(tmp_path):
    import paper_analog

    work = tmp_path / "work"
    paper_analog.main(["--seeds", "1", "--scale", "0.01", "--problems", "5", "--threads", "1",
                       "--workdir", str(work), "--no-docs"])
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"models", *paper_analog.SETTINGS}
    for setting in paper_analog.SETTINGS:
        got = {r["variant"] for r in rows if r["setting"] == setting}
        assert got == {"target", *paper_analog.VARIANTS}
    # the plain baseline really is target + skill - reference, tensor by tensor
    from safetensors.torch import load_file

    seed = work / "seed0"
    merged = load_file(str(seed / "merges" / "target--plain" / "model.safetensors"))
    t, s, r = (load_file(str(seed / n / "model.safetensors")) for n in ("target", "skill", "reference"))
    assert set(merged) == set(t)
    for name, value in merged.items():
        torch.testing.assert_close(value, t[name] + s[name] - r[name], atol=1e-6, rtol=0)
    # the scrambled target computes what the target computes, in other coordinates
    by = {(r["setting"], r["variant"]): r for r in rows}
    assert by[("same base, scrambled", "target")]["kl_skill"] == pytest.approx(
        by[("same base", "target")]["kl_skill"], abs=1e-4)
    # paper_analog's report reads the saved results back without retraining
    paper_analog.main(["--workdir", str(work), "--from-results", "--no-docs", "--problems", "5"])
