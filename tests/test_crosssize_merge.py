"""A pruned child as the base of an ordinary transfer recipe, through mergekit itself.

The child is the parent pruned by crosssize's importance-sorted pruning on every axis
(residual channels, a KV group with its query heads, a query head within the kept group, MLP
neurons, a layer) and not retrained, so the exact answer is known: the merged model is the
skill model pruned by the same indices, weight for weight (see docs/cross-size.md)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from mergekit_symalign import crosssize as cs
from mergekit_symalign.errors import SymAlignConfigError

from .conftest import make_config, make_model, save
from .support import aligned_recipe, load_tensors, perturbed, run_mergekit_yaml, run_recipe

SIZES = dict(hidden=36, kv_heads=1, heads_per_group=2, intermediate=56, drop_layers=(2,))
TA = "symmetry_aligned_task_arithmetic"


def _pair(root, arch="llama", seed=0, **sizes):
    """(parent, skill, second skill, child) folders and the true map."""
    config = make_config(arch, num_hidden_layers=4)
    parent = make_model(arch, seed=seed, num_hidden_layers=4).state_dict()
    skills = [perturbed(parent, seed=seed + 1, scale=0.05), perturbed(parent, seed=seed + 2, scale=0.05)]
    child, child_cfg, truth = cs.prune_state_dict(parent, config, **(sizes or SIZES))
    root.mkdir(parents=True, exist_ok=True)
    paths = dict(parent=save(parent, config, root / "parent"),
                 skill=save(skills[0], config, root / "skill"),
                 skill2=save(skills[1], config, root / "skill2"),
                 child=save(child, child_cfg, root / "child"))
    return paths, dict(config=config, parent=parent, skills=skills, child=child, truth=truth)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("xsize"))


def _max_diff(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want)


def test_task_arithmetic_through_mergekit_yaml_equals_the_pruned_skill_model(llama_pair, tmp_path):
    paths, m = llama_pair
    out = tmp_path / "out"
    run = run_mergekit_yaml(aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]]),
                            tmp_path / "r.yml", out, "--no-copy-tokenizer")
    assert "aligned a pruned child" in run.stderr and "hidden_size 48 -> 36" in run.stderr
    want = cs.restrict_state_dict(m["skills"][0], m["config"], m["truth"])
    assert _max_diff(load_tensors(out), want) < 1e-6
    # the child's shape and layer count, in its own coordinates; the card says what was done
    import json
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
            cfg["num_key_value_heads"]) == (36, 3, 56, 1)
    card = (out / "README.md").read_text()
    assert "aligned a pruned child" in card and "layer map solved [0, 1, 3]" in card
    # a shape-blind transfer (first rows/columns, child layer k = parent layer k) is not it
    blind = cs.by_position(m["child"], m["parent"], m["skills"][0])
    assert _max_diff(blind, want) > 1e-2


def test_ties_and_two_skills_match_the_restricted_combination(llama_pair, tmp_path):
    """TIES at density 1 with one skill keeps the whole delta; two skills under task
    arithmetic add restrict(w1 tau1 + w2 tau2)."""
    paths, m = llama_pair
    out = run_recipe(aligned_recipe("symmetry_aligned_ties", paths["child"], paths["parent"],
                                    [(paths["skill"], {"density": 1.0})]), tmp_path / "ties")
    want = cs.restrict_state_dict(m["skills"][0], m["config"], m["truth"])
    assert _max_diff(load_tensors(out), want) < 1e-6
    # DARE at density 1 drops nothing and rescales by 1
    out = run_recipe(aligned_recipe("symmetry_aligned_dare_linear", paths["child"], paths["parent"],
                                    [(paths["skill"], {"density": 1.0})]), tmp_path / "dare")
    assert _max_diff(load_tensors(out), want) < 1e-6
    out = run_recipe(aligned_recipe(TA, paths["child"], paths["parent"],
                                    [(paths["skill"], {"weight": 0.7}), (paths["skill2"], {"weight": 0.4})]),
                     tmp_path / "two")
    combined = {k: m["parent"][k] + 0.7 * (m["skills"][0][k] - m["parent"][k])
                + 0.4 * (m["skills"][1][k] - m["parent"][k]) for k in m["parent"]}
    want = cs.transfer(m["child"], m["parent"], combined, m["config"], m["truth"])
    assert _max_diff(load_tensors(out), want) < 1e-5


def test_qwen2_child_with_biases(tmp_path):
    paths, m = _pair(tmp_path / "models", arch="qwen2")
    out = run_recipe(aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]]), tmp_path / "out")
    want = cs.restrict_state_dict(m["skills"][0], m["config"], m["truth"])
    assert _max_diff(load_tensors(out), want) < 1e-6


def test_given_layer_map_is_used_and_a_bad_one_refused(llama_pair, tmp_path):
    paths, m = llama_pair
    def rec(layer_map):
        return aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]], layer_map=layer_map)
    out = run_recipe(rec("0, 1, 3"), tmp_path / "good")
    want = cs.restrict_state_dict(m["skills"][0], m["config"], m["truth"])
    assert _max_diff(load_tensors(out), want) < 1e-6
    for bad, match in (("0, 1", "has 2 entries but .* has 3 layers"),
                       ("0, 1, 4", r"names .* layers \[4\].*0\.\.3"),
                       ("0, 3, 1", "not strictly increasing"),
                       ("zero, one, three", "not a comma-separated list")):
        with pytest.raises(SymAlignConfigError, match=match):
            run_recipe(rec(bad), tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    # a wrong (valid) map is used as given: child layer 2 then takes parent layer 2's delta
    out = run_recipe(rec("0, 1, 2"), tmp_path / "wrong")
    assert _max_diff(load_tensors(out), want) > 1e-3


def _refused(rec, out, match):
    with pytest.raises(SymAlignConfigError, match=match) as info:
        run_recipe(rec, out)
    assert not out.exists()
    return str(info.value)


@pytest.mark.parametrize("setting, match", [
    ({"output_frame": "reference"}, "the reference's frame is wider than the child"),
    ({"residual": "permutation"}, "residual: permutation moves a model's residual stream"),
])
def test_settings_without_a_meaning_for_a_child_are_refused(llama_pair, tmp_path, setting, match):
    paths, _ = llama_pair
    msg = _refused(aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]], **setting),
                   tmp_path / "out", match)
    assert paths["child"] in msg and "pruned child" in msg


def test_pair_given_the_wrong_way_round_is_refused(llama_pair, tmp_path):
    paths, _ = llama_pair
    msg = _refused(aligned_recipe(TA, paths["parent"], paths["child"], [paths["skill"]]),
                   tmp_path / "out", "wrong way round")
    assert paths["parent"] in msg and "hidden_size" in msg and "48 > " in msg


@pytest.mark.parametrize("change, match", [
    (dict(head_dim=8), "head_dim: .* 12 vs .* 8"),
    (dict(vocab_size=80), "vocab_size: .* 96 vs .* 80"),
    (dict(hidden_size=36, intermediate_size=96), "neither model can be a pruned child"),
])
def test_a_base_that_cannot_be_a_child_is_refused_with_its_sizes(llama_pair, tmp_path, change, match):
    paths, _ = llama_pair
    config = make_config("llama", **{**dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=56), **change})
    other = save(make_model("llama", seed=5, **{k: getattr(config, k) for k in change} | dict(
        hidden_size=config.hidden_size, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=config.intermediate_size)), config, tmp_path / "other")
    msg = _refused(aligned_recipe(TA, other, paths["parent"], [paths["skill"]]), tmp_path / "out", match)
    assert other in msg and paths["parent"] in msg


def test_a_base_of_another_architecture_is_named(llama_pair, tmp_path):
    paths, _ = llama_pair
    config = make_config("qwen2", hidden_size=36, num_attention_heads=6, num_key_value_heads=2)
    other = save(make_model("qwen2", seed=5, hidden_size=36, num_attention_heads=6, num_key_value_heads=2),
                 config, tmp_path / "qwen")
    msg = _refused(aligned_recipe(TA, other, paths["parent"], [paths["skill"]]), tmp_path / "out",
                   "different architectures")
    assert other in msg and "qwen2" in msg and "llama" in msg


def test_a_child_of_another_parent_is_warned_with_its_figure(llama_pair, tmp_path, caplog):
    paths, m = llama_pair
    stranger_parent = make_model("llama", seed=11, num_hidden_layers=4).state_dict()
    stranger, stranger_cfg, _ = cs.prune_state_dict(stranger_parent, m["config"], **SIZES)
    path = save(stranger, stranger_cfg, tmp_path / "stranger")
    with caplog.at_level(logging.WARNING):
        run_recipe(aligned_recipe(TA, path, paths["parent"], [paths["skill"]]), tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if "does not look like a pruned child" in r.getMessage()]
    assert warned and path in warned[0]
    figure = float(re.search(r"mean cosine (-?[0-9.]+)", warned[0]).group(1))
    assert figure < cs.MIN_MATCH_COSINE
    assert any("aligned a pruned child" in r.getMessage() for r in caplog.records)


def test_slices_are_refused_for_a_child(llama_pair, tmp_path):
    paths, _ = llama_pair
    rec = {"merge_method": TA, "base_model": paths["child"], "dtype": "float32",
           "slices": [{"sources": [
               {"model": paths["child"], "layer_range": [0, 3]},
               {"model": paths["parent"], "layer_range": [0, 3], "parameters": {"role": "reference"}},
               {"model": paths["skill"], "layer_range": [0, 3], "parameters": {"weight": 1.0}}]}]}
    _refused(rec, tmp_path / "out", "not `slices:`")


def test_skill_of_another_depth_is_refused(llama_pair, tmp_path):
    paths, m = llama_pair
    config = make_config("llama", num_hidden_layers=3)
    shallow = save(make_model("llama", seed=3, num_hidden_layers=3), config, tmp_path / "shallow")
    msg = _refused(aligned_recipe(TA, paths["child"], paths["parent"], [shallow]), tmp_path / "out",
                   "has 3 layers but the reference")
    assert shallow in msg


def _report(recipe, tmp_path, capsys):
    import json

    from mergekit_symalign.cli import main

    from .support import write_recipe

    status = main(["report", write_recipe(recipe, tmp_path / "recipe.yml"), str(tmp_path / "report"), "--quiet"])
    printed = capsys.readouterr().out
    return status, json.loads((tmp_path / "report" / "report.json").read_text()), printed


def test_report_shows_each_child_layer_s_parent_and_share_explained(llama_pair, tmp_path, capsys):
    paths, m = llama_pair
    status, doc, printed = _report(aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]]),
                                   tmp_path / "exact", capsys)
    assert status == 0
    child = doc["pruned_child"]
    assert child["layer_map"] == [0, 1, 3] and child["warning"] is None
    assert [r["parent_layer"] for r in child["layers"]] == [0, 1, 3, "module"]
    assert all(abs(r["explained"] - 1) < 1e-6 for r in child["layers"])  # not retrained
    assert "child layer 2 <- parent layer 3: 1.000 of the child explained" in printed
    assert "every layer is at least 0.5 explained" in printed
    assert "| 2 | 3 | 1.000 |" in (tmp_path / "exact" / "report" / "report.md").read_text()
    assert not (tmp_path / "exact" / "out").exists()  # the report merges nothing

    # one child layer moved far from its parent (retrained hard there): named in the verdict
    drifted = {k: (v + 2 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
                   if k.startswith("model.layers.2.") and v.dim() == 2 else v)
               for k, v in m["child"].items()}
    from transformers import AutoConfig
    path = save(drifted, AutoConfig.from_pretrained(paths["child"]), tmp_path / "drifted")
    status, doc, printed = _report(aligned_recipe(TA, path, paths["parent"], [paths["skill"]], layer_map="0, 1, 3"),
                                   tmp_path / "drifted_report", capsys)
    assert status == 0
    explained = {r["child_layer"]: r["explained"] for r in doc["pruned_child"]["layers"]}
    assert explained[2] < 0.5 < explained[1]
    assert f"child layer 2 is only {explained[2]:.3f} explained by parent layer 3" in printed


CHILD_RECIPES = ["minitron_4b_width_transfer.yml", "mistral_nemo_minitron_8b_transfer.yml",
                 "llama3_2_3b_depth_width_transfer.yml"]


@pytest.mark.parametrize("name", CHILD_RECIPES)
def test_shipped_child_recipes_pass_the_static_checks(name):
    """Parsed by mergekit's config loader, checked as a recipe and as a pruned-child recipe
    (no model is opened: the sizes are the Hub's, which tests do not reach)."""
    from pathlib import Path

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    from mergekit_symalign.crosssize_planning import check_child_settings
    from mergekit_symalign.validation import check_recipe, recipe_reference

    path = Path(__file__).parent.parent / "recipes" / name
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    method = registry.get(config.merge_method)
    check_recipe(config, method)
    reference = recipe_reference(config)
    assert reference != config.base_model
    check_child_settings(config, method.spec.name, config.base_model, reference)


def test_tied_child_of_an_untied_parent_takes_the_embedding_s_delta(llama_pair, tmp_path):
    """Llama-3.2-3B ties its embeddings, Llama-3.1-8B does not: the output has no lm_head and
    its embedding is the child's plus the restriction of the parent's embedding delta."""
    paths, m = llama_pair
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(paths["child"])
    config.tie_word_embeddings = True
    tied = {**m["child"], "lm_head.weight": m["child"]["model.embed_tokens.weight"]}
    path = save(tied, config, tmp_path / "tied")  # transformers saves no tied lm_head
    assert "lm_head.weight" not in load_tensors(path)
    out = load_tensors(run_recipe(aligned_recipe(TA, path, paths["parent"], [paths["skill"]]), tmp_path / "out"))
    want = cs.restrict_state_dict(m["skills"][0], m["config"], m["truth"])
    del want["lm_head.weight"]
    assert _max_diff(out, want) < 1e-6


def test_real_smollm2_pruned_child_through_mergekit(tmp_path):
    """SmolLM2-135M-Instruct (tied embeddings, GQA 9/3) pruned 576 -> 432 channels, 3 -> 2 KV
    groups, 1536 -> 1152 neurons, layers 9, 20, 21 of 30 dropped, not retrained; skill = the
    model plus 1 % of each tensor's standard deviation of noise: the merge through mergekit is
    the pruned skill model, weight for weight."""
    smollm = pytest.importorskip("examples.smollm")
    try:
        model, _ = smollm.load_smollm2(torch.float32)
    except smollm.SmolLM2Missing as err:
        pytest.skip(str(err))
    config = model.config
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    skill = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in parent.items()}
    skill["lm_head.weight"] = skill["model.embed_tokens.weight"]  # tied, as saved
    child, child_cfg, truth = cs.prune_state_dict(parent, config, hidden=432, kv_heads=2,
                                                  intermediate=1152, drop_layers=(9, 20, 21))
    child["lm_head.weight"] = child["model.embed_tokens.weight"]
    paths = {n: save(sd, c, tmp_path / n) for n, sd, c in
             (("parent", parent, config), ("skill", skill, config), ("child", child, child_cfg))}
    out = load_tensors(run_recipe(aligned_recipe(TA, paths["child"], paths["parent"], [paths["skill"]]),
                                  tmp_path / "out"))
    want = cs.restrict_state_dict({k: v for k, v in skill.items() if k != "lm_head.weight"}, config, truth)
    assert _max_diff(out, want) < 1e-6
