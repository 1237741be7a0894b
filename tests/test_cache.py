"""Saved alignments (alignment_cache): reused only for exactly the inputs they were solved
from, shared between merges and the state-dict API, never applied when unreadable."""

import torch

from mergekit_symalign import cache
from mergekit_symalign.statedict import align_state_dict

from .support import aligned_recipe, run_recipe
from .conftest import assert_tensors_close, load, save


class Counting:
    """Counts the layer and residual solves (and can forbid them)."""

    def __init__(self, monkeypatch, forbid=False):
        import mergekit_symalign.residual as res
        import mergekit_symalign.solve as solve

        self.calls = 0
        real_layer, real_residual = solve.align_layer, res.solve

        def layer(*a, **k):
            self.calls += 1
            assert not forbid, "solved although a saved alignment exists"
            return real_layer(*a, **k)

        def residual(*a, **k):
            self.calls += 1
            assert not forbid, "solved although a saved alignment exists"
            return real_residual(*a, **k)

        monkeypatch.setattr(solve, "align_layer", layer)  # the one solve: merges and statedict
        monkeypatch.setattr(res, "solve", residual)


def recipe(family, method="task_arithmetic", skill=None, **params):
    return aligned_recipe(f"symmetry_aligned_{method}", family["sibling_scrambled"],
                          family["reference"], [(family["skill_scrambled"], skill or {})], **params)


def test_a_second_merge_reuses_the_saved_alignment(family, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    first = load(run_recipe(recipe(family, residual="permutation", alignment_cache=str(folder)),
                            tmp_path / "first"))
    entries = sorted(p.name for p in folder.iterdir())
    layers = family["config"].num_hidden_layers
    assert len(entries) == 2 * (2 * layers + 2)  # (2 models x layers + 2 residuals) x 2 files
    # another method and weights, same models and settings: nothing is solved again
    Counting(monkeypatch, forbid=True)
    ties = {"density": 0.5, "weight": 0.7}
    again = load(run_recipe(recipe(family, "ties", ties, residual="permutation",
                                   alignment_cache=str(folder)), tmp_path / "again"))
    monkeypatch.undo()
    fresh = load(run_recipe(recipe(family, "ties", ties, residual="permutation"), tmp_path / "fresh"))
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(again[k], first[k]) for k in first)  # it really was ties


def test_changed_inputs_or_settings_are_solved_again(family, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "a")
    counter = Counting(monkeypatch)
    run_recipe(recipe(family, alignment_cache=str(folder), scaling=False), tmp_path / "b")
    assert counter.calls == 2 * family["config"].num_hidden_layers  # other settings: solved
    edited = load(family["skill_scrambled"])
    edited["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    path = save(edited, family["config"], tmp_path / "edited")
    counter.calls = 0
    rec = aligned_recipe("symmetry_aligned_task_arithmetic", family["sibling_scrambled"],
                         family["reference"], [path], alignment_cache=str(folder))
    run_recipe(rec, tmp_path / "c")
    assert counter.calls == 1  # only the edited layer of the edited model


def test_unreadable_entry_is_solved_again_not_applied(family, tmp_path, caplog, monkeypatch):
    folder = tmp_path / "cache"
    want = load(run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "a"))
    for path in folder.glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:40])  # truncated
    counter = Counting(monkeypatch)
    with caplog.at_level("WARNING"):
        got = load(run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "b"))
    assert "unreadable" in caplog.text and counter.calls > 0
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_state_dict_api_shares_the_merge_cache(family, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    run_recipe(recipe(family, residual="permutation", alignment_cache=str(folder)), tmp_path / "a")
    Counting(monkeypatch, forbid=True)
    reference, model = load(family["reference"]), load(family["skill_scrambled"])
    cached, _ = align_state_dict(reference, model, family["config"], residual="permutation",
                                 cache=str(folder))
    monkeypatch.undo()
    solved, _ = align_state_dict(reference, model, family["config"], residual="permutation")
    assert_tensors_close(cached, solved, rtol=0.0)


def test_fingerprint_sees_every_byte():
    a = {"w": torch.randn(4, 3), "b": torch.randn(3).to(torch.bfloat16)}
    b = {k: v.clone() for k, v in a.items()}
    key = cache.Fingerprint("t").tensors("m", a).hexdigest()
    assert cache.Fingerprint("t").tensors("m", b).hexdigest() == key
    b["b"][2] = b["b"][2] + 1
    assert cache.Fingerprint("t").tensors("m", b).hexdigest() != key
    assert cache.Fingerprint("t").tensors("m", {"w": a["w"].double(), "b": a["b"]}).hexdigest() != key


def test_activation_alignment_is_cached_too(tmp_path, monkeypatch):
    """alignment: activations (with the residual stream): the second merge streams no model."""
    from .conftest import scrambled_pair_with_tokenizers, word_calibration
    import mergekit_symalign.activations as activations

    paths = scrambled_pair_with_tokenizers(tmp_path)
    folder = tmp_path / "cache"
    rec = aligned_recipe("symmetry_aligned_task_arithmetic", paths["base"], paths["reference"],
                         [paths["skill"]], alignment="activations", residual="permutation",
                         calibration=word_calibration(tmp_path / "c.txt"), calibration_max_tokens=32,
                         alignment_cache=str(folder))
    first = load(run_recipe(rec, tmp_path / "a"))

    def forbidden(*a, **k):
        raise AssertionError("streamed although a saved alignment exists")

    monkeypatch.setattr(activations, "LayerStreamer", forbidden)
    again = load(run_recipe(rec, tmp_path / "b"))
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_card_record_is_cached_next_to_the_alignment(family, tmp_path, monkeypatch, caplog):
    """The model card's per-layer distances are a function of the entry's inputs: a second
    merge reads them from the cache (no measurement) and writes the same card rows; an
    unreadable record is measured again."""
    import logging
    from pathlib import Path

    import mergekit_symalign.measure as report

    folder = tmp_path / "cache"
    first = run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "a", write_model_card=True)
    records = sorted(folder.glob("*.record.json"))
    assert len(records) == 2 * family["config"].num_hidden_layers  # base and skill, every layer
    measured = []
    real = report.distances_before_after
    monkeypatch.setattr(report, "distances_before_after", lambda *a: measured.append(1) or real(*a))
    second = run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "b", write_model_card=True)
    assert not measured

    def rows(out):
        return [line for line in (Path(out) / "README.md").read_text().splitlines()
                if line.startswith(f"| {family['sibling_scrambled']} | ")]

    assert rows(first) == rows(second) and rows(first)
    records[0].write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
        third = run_recipe(recipe(family, alignment_cache=str(folder)), tmp_path / "c", write_model_card=True)
    assert len(measured) == 1 and "record" in caplog.text
    assert rows(third) == rows(first)
