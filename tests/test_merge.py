"""End to end through mergekit: run_merge and an unmodified `mergekit-yaml` subprocess."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from examples.common import (
    aligned_recipe as transfer,
    perturbed,
    plain_transfer_recipe as plain_transfer,
    run_mergekit_yaml,
    run_recipe,
)
from mergekit_symalign.methods import PREFIX, WRAPPED_METHODS

from mergekit_symalign.statedict import scramble_state_dict

from .conftest import (
    ARCH_CONFIGS,
    logits,
    make_config,
    make_model,
    save,
    scale_of,
)


def close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * scale_of(b)


@pytest.fixture(scope="module")
def expected(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("expected")
    return {
        "skill": logits(family["skill"]),
        "sibling+tau": logits(
            run_recipe(plain_transfer(family["sibling"], family["reference"], family["skill"]),
                       root / "sib")
        ),
    }


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_aligned_transfer_onto_scrambled_reference_equals_unscrambled(family, expected, tmp_path, frame):
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["reference_scrambled"], family["reference"],
                 [(family["skill"], {"align": False})], output_frame=frame),
        tmp_path / "out",
    )
    assert close(logits(out), expected["skill"])
    merged, scrambled = load_file(f"{out}/model.safetensors"), load_file(
        f"{family['reference_scrambled']}/model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    skill = load_file(f"{family['skill']}/model.safetensors")
    if frame == "base":  # coordinates of the (scrambled) base: close to it, not to the skill
        assert (merged[name] - scrambled[name]).norm() < (merged[name] - skill[name]).norm()
    else:  # coordinates of the reference: equal to the skill model itself
        assert torch.allclose(merged[name], skill[name], atol=1e-5)


def test_plain_task_arithmetic_fails_on_scrambled_target(family, expected, tmp_path):
    out = run_recipe(
        plain_transfer(family["reference_scrambled"], family["reference"], family["skill"]),
        tmp_path / "plain",
    )
    assert not close(logits(out), expected["skill"], tol=0.05)


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_aligned_transfer_onto_scrambled_sibling_equals_unscrambled(family, expected, tmp_path, frame):
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["sibling_scrambled"], family["reference"],
                 [(family["skill"], {})], output_frame=frame),
        tmp_path / "out",
    )
    # aligned(scrambled sibling) = aligned(sibling): same result as the unscrambled transfer
    unscrambled = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                 [(family["skill"], {})], output_frame=frame),
        tmp_path / "unscrambled",
    )
    assert close(logits(out), logits(unscrambled))
    # and aligning an unscrambled sibling changes its function not at all: it equals plain TA
    assert close(logits(unscrambled), expected["sibling+tau"], tol=1e-3)


def test_scrambled_skill_model_is_aligned_too(family, expected, tmp_path):
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["reference_scrambled"], family["reference"],
                 [(family["skill_scrambled"], {})]),
        tmp_path / "out",
    )
    assert close(logits(out), expected["skill"])


def test_align_false_leaves_a_skill_model_unaligned(family, expected, tmp_path):
    errors = {}
    for align in (True, False):
        out = run_recipe(
            transfer(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                     [(family["skill_scrambled"], {"align": align})]),
            tmp_path / str(align),
        )
        errors[align] = float((logits(out) - expected["sibling+tau"]).abs().max())
    # aligned: the scrambled skill vector lands where it belongs; unaligned: it does not
    assert errors[True] < 0.05 * errors[False]


@pytest.mark.parametrize("switch", ["permutation", "rotation", "scaling"])
def test_switch_off_means_that_symmetry_is_not_used(family, expected, tmp_path, switch):
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["reference_scrambled"], family["reference"],
                 [(family["skill"], {"align": False})], **{switch: False}),
        tmp_path / "out",
    )
    # the target is scrambled by all three kinds; without one of them it cannot be undone
    assert not close(logits(out), expected["skill"], tol=0.01)


@pytest.mark.parametrize("wrapped", WRAPPED_METHODS)
def test_every_aligned_gta_variant_runs_and_is_exact(family, tmp_path, wrapped):
    """Two skill models onto a scrambled target: the same as onto the unscrambled target."""
    skills = [(family["skill"], {"density": 0.7}), (family["sibling"], {"density": 0.7, "weight": 0.5})]
    outs = {}
    for name, base in (("scrambled", "reference_scrambled"), ("plain", "reference")):
        outs[name] = logits(run_recipe(
            transfer(PREFIX + wrapped, family[base], family["reference"], skills),
            tmp_path / name, random_seed=0,
        ))
    assert torch.isfinite(outs["scrambled"]).all()
    if wrapped in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        assert close(outs["scrambled"], outs["plain"])  # deterministic methods: exact


@pytest.mark.parametrize("wrapped", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_plain_fusion_without_alignment_is_mergekits_method(family, tmp_path, wrapped):
    """No reference, no alignment: bit for bit mergekit's own method."""
    models = [{"model": family["skill"], "parameters": {"weight": 1.0, "density": 0.6}},
              {"model": family["sibling"], "parameters": {"weight": 0.5, "density": 0.6}}]
    ours = {"merge_method": PREFIX + wrapped, "base_model": family["reference"], "dtype": "float32",
            "models": [{**m, "parameters": {**m["parameters"], "align": False}} for m in models]}
    theirs = {"merge_method": wrapped, "base_model": family["reference"], "models": models,
              "dtype": "float32"}
    a = load_file(f"{run_recipe(ours, tmp_path / 'ours')}/model.safetensors")
    b = load_file(f"{run_recipe(theirs, tmp_path / 'theirs')}/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_alignment_runs_once_per_layer_and_model(family, tmp_path, monkeypatch):
    import mergekit_symalign.tasks as tasks

    calls = []
    real = tasks.align_layer

    def counting(spec, reference, model, switches, label):
        calls.append(label)
        return real(spec, reference, model, switches, label=label)

    monkeypatch.setattr(tasks, "align_layer", counting)
    run_recipe(
        transfer(PREFIX + "ties", family["reference_scrambled"], family["reference"],
                 [(family["skill"], {}), (family["sibling"], {"weight": 0.5})]),
        tmp_path / "out",
    )
    layers = family["config"].num_hidden_layers
    assert len(calls) == layers * 3  # base + two skill models, each layer once
    assert len(set(calls)) == 3


def test_slices_with_different_layer_ranges(family, tmp_path):
    """Output layer i may come from different input layers: each model's own prefix is used."""
    def src(model, rng, **p):
        return {"model": model, "layer_range": rng, "parameters": p}

    recipe = {
        "merge_method": PREFIX + "task_arithmetic",
        "base_model": family["reference_scrambled"],
        "dtype": "float32",
        "slices": [{"sources": [
            src(family["reference_scrambled"], [0, 2]),
            src(family["reference"], [0, 2], role="reference"),
            src(family["skill"], [0, 2], weight=1.0),
        ]}],
    }
    out = run_recipe(recipe, tmp_path / "out")
    assert close(logits(out), logits(family["skill"]))
    recipe["slices"][0]["sources"][2]["layer_range"] = [1, 2]  # lengths differ: mergekit refuses
    with pytest.raises(RuntimeError, match="same number of layers"):
        run_recipe(recipe, tmp_path / "bad")


def test_mergekit_yaml_subprocess_knows_the_methods(family, expected, tmp_path):
    recipe = transfer(PREFIX + "task_arithmetic", family["reference_scrambled"], family["reference"],
                      [(family["skill"], {"align": False})])
    run_mergekit_yaml(recipe, tmp_path / "recipe.yml", tmp_path / "out", "--no-copy-tokenizer",
                      quiet=False, timeout=600)  # raises with mergekit's output if it fails
    assert close(logits(str(tmp_path / "out")), expected["skill"])


def test_interpreter_start_stays_light():
    """The .pth hook must not import torch or the plugin in processes that never use mergekit."""
    code = "import sys; print('torch' in sys.modules, 'mergekit_symalign' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    # importing mergekit.plan (as every entry point does) registers the methods and hooks
    # the planner class itself
    code = ("import mergekit.plan as p, mergekit.merge_methods.registry as r; "
            "print(r.get('symmetry_aligned_ties').spec.name, '_symalign_original' in vars(p.MergePlanner))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["symmetry_aligned_ties", "True"]


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_aligned_merge_onto_scrambled_model_per_architecture(arch, tmp_path):
    """Every supported architecture, through mergekit: onto a scrambled reference, the
    aligned transfer is the skill model itself; on a scrambled sibling, the unscrambled one."""
    config = make_config(arch)
    ref = make_model(arch, seed=1)
    paths = {
        "ref": save(ref, config, tmp_path / "ref"),
        "skill": save(perturbed(ref, seed=2, scale=0.05), config, tmp_path / "skill"),
        "ref_scr": save(scramble_state_dict(ref.state_dict(), config, seed=3)[0], config,
                        tmp_path / "ref_scr"),
    }
    out = run_recipe(transfer(PREFIX + "task_arithmetic", paths["ref_scr"], paths["ref"],
                              [(paths["skill"], {})]), tmp_path / "out")
    assert close(logits(out), logits(paths["skill"]))


@pytest.fixture(scope="module")
def family_with_tokenizers(family, tmp_path_factory):
    import shutil

    from .conftest import save_word_tokenizer

    root = tmp_path_factory.mktemp("tok_family")
    out = dict(family)
    for name in ("reference", "skill", "sibling", "reference_scrambled", "skill_scrambled",
                 "sibling_scrambled"):
        shutil.copytree(family[name], root / name)
        save_word_tokenizer(root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_activation_alignment_through_mergekit(family_with_tokenizers, expected, tmp_path, frame):
    from .conftest import word_calibration

    fam = family_with_tokenizers
    calib = word_calibration(tmp_path / "calib.txt")
    out = run_recipe(
        transfer(PREFIX + "ties", fam["reference_scrambled"], fam["reference"],
                 [(fam["skill_scrambled"], {})], alignment="activations", calibration=calib,
                 calibration_samples=64, calibration_max_tokens=32, output_frame=frame),
        tmp_path / "out",
    )
    plain = run_recipe(
        transfer(PREFIX + "ties", fam["reference"], fam["reference"], [(fam["skill"], {})]),
        tmp_path / "plain",
    )
    assert close(logits(out), logits(plain))


def test_activation_alignment_refuses_bad_calibration(family_with_tokenizers, tmp_path):
    from mergekit_symalign.errors import SymAlignConfigError

    fam = family_with_tokenizers
    (tmp_path / "empty.txt").write_text("\n\n")
    for calib, match in ((str(tmp_path / "missing.txt"), "missing|not found|does not exist"),
                         (str(tmp_path / "empty.txt"), "empty|no prompts")):
        with pytest.raises(SymAlignConfigError, match=match):
            run_recipe(transfer(PREFIX + "task_arithmetic", fam["sibling"], fam["reference"],
                                [(fam["skill"], {})], alignment="activations", calibration=calib),
                       tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_device_and_memory_options_give_the_same_merge(family, tmp_path):
    """--read-to-gpu / --low-cpu-memory / --device route tensors differently, not the result
    (on CPU here; the GPU path is the same graph with another math device)."""
    rec = transfer(PREFIX + "task_arithmetic", family["sibling_scrambled"], family["reference"],
                   [(family["skill"], {})])
    a = load_file(f"{run_recipe(rec, tmp_path / 'a')}/model.safetensors")
    b = load_file(f"{run_recipe(rec, tmp_path / 'b', device='cpu', read_to_gpu=True, low_cpu_memory=True)}"
                  f"/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_section_uses_mergekits_vocabulary_path(family_with_tokenizers, tmp_path):
    """`tokenizer: {source: base}` (as in the Tulu recipe) routes embeddings through
    mergekit's PermutedVocabulary; with equal vocabularies the result is unchanged."""
    fam = family_with_tokenizers
    rec = transfer(PREFIX + "task_arithmetic", fam["sibling_scrambled"], fam["reference"],
                   [(fam["skill"], {})])
    a = load_file(f"{run_recipe(rec, tmp_path / 'a')}/model.safetensors")
    b = load_file(f"{run_recipe({**rec, 'tokenizer': {'source': 'base'}}, tmp_path / 'b')}"
                  f"/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_skill_model_with_a_larger_vocabulary(family_with_tokenizers, tmp_path):
    """A skill model with one extra token (as fine-tunes often add): mergekit's tokenizer
    machinery maps its embeddings onto the base's vocabulary; layers are aligned as usual."""
    import shutil

    from .conftest import VOCAB, make_config, save, save_word_tokenizer

    fam = family_with_tokenizers
    sd = load_file(f"{fam['skill']}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], 0.02 * torch.randn(1, sd[name].shape[1], generator=g)])
    bigger = save(sd, make_config("llama", vocab_size=VOCAB + 1), tmp_path / "bigger")
    save_word_tokenizer(tmp_path / "bigger", vocab_size=VOCAB + 1)
    rec = transfer(PREFIX + "task_arithmetic", fam["sibling_scrambled"], fam["reference"],
                   [(bigger, {})])
    with pytest.raises(ValueError, match="size mismatch"):
        run_recipe(rec, tmp_path / "no_tokenizer_section")
    shutil.rmtree(tmp_path / "no_tokenizer_section", ignore_errors=True)
    out = run_recipe({**rec, "tokenizer": {"source": "base"}}, tmp_path / "out")
    same_vocab = run_recipe(transfer(PREFIX + "task_arithmetic", fam["sibling_scrambled"],
                                     fam["reference"], [(fam["skill"], {})]), tmp_path / "ref")
    assert close(logits(out), logits(same_vocab))
