"""End to end through mergekit: run_merge and an unmodified `mergekit-yaml` subprocess."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergekit_symalign.methods import PREFIX, WRAPPED_METHODS
from mergekit_symalign.statedict import scramble_state_dict

from .support import (
    aligned_recipe as transfer,
    perturbed,
    plain_transfer_recipe as plain_transfer,
    run_mergekit_yaml,
    run_recipe,
)
from .conftest import (
    ARCH_CONFIGS,
    assert_tensors_close,
    load,
    logits,
    make_config,
    make_model,
    save,
    scale_of,
    scrambled_like,
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
    """Base = the reference under the scramble T: the transfer is the skill model itself, in
    the reference's coordinates, or T(skill) in the base's: known exactly, tensor by tensor."""
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["reference_scrambled"], family["reference"],
                 [(family["skill"], {"align": False})], output_frame=frame),
        tmp_path / "out",
    )
    skill = load(family["skill"])
    want = scrambled_like(skill, family, "reference_scrambled") if frame == "base" else skill
    assert_tensors_close(load(out), want)
    assert close(logits(out), expected["skill"])


def test_plain_task_arithmetic_fails_on_scrambled_target(family, expected, tmp_path):
    out = run_recipe(
        plain_transfer(family["reference_scrambled"], family["reference"], family["skill"]),
        tmp_path / "plain",
    )
    assert not close(logits(out), expected["skill"], tol=0.05)


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_aligned_transfer_onto_scrambled_sibling_equals_unscrambled(family, expected, tmp_path, frame):
    """Base = a fine-tuned sibling under an isometric scramble T (alignment is exactly
    equivariant under isometries): the merge is T(merge onto the sibling) in the base's
    coordinates, and the very same merge in the reference's."""
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["sibling_scrambled"], family["reference"],
                 [(family["skill"], {})], output_frame=frame),
        tmp_path / "out",
    )
    unscrambled = run_recipe(
        transfer(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                 [(family["skill"], {})], output_frame=frame),
        tmp_path / "unscrambled",
    )
    want = load(unscrambled)
    if frame == "base":
        want = scrambled_like(want, family, "sibling_scrambled")
    # Not to float rounding: on the sibling the rotations that merely fit the fine-tune's
    # noise are snapped to the identity, on its scramble they are T^-1 times that noise fit.
    assert_tensors_close(load(out), want, rtol=1e-2)
    if frame == "base":
        # on the unscrambled sibling alignment finds the identity: plain task arithmetic
        plain = run_recipe(plain_transfer(family["sibling"], family["reference"], family["skill"]),
                           tmp_path / "plain")
        assert_tensors_close(load(unscrambled), load(plain))


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
def test_every_aligned_gta_variant_is_exact(family, tmp_path, wrapped):
    """Two skill models onto the scrambled reference T(R), for every wrapped method (DARE and
    DELLA with a fixed seed, so both runs drop the same entries): T(the merge onto R).

    The unscrambled run merges onto a copy of R at another path, so that it is aligned too
    (to the identity) and mergekit runs its tasks in the same order: DARE's random drops are
    drawn tensor by tensor from one seeded generator, in execution order."""
    skills = [(family["skill"], {"density": 0.7}), (family["sibling"], {"density": 0.7, "weight": 0.5})]
    copy = tmp_path / "reference_copy"
    shutil.copytree(family["reference"], copy)
    bases = {"reference_scrambled": family["reference_scrambled"], "reference_copy": str(copy)}
    outs = {}
    for name, base in (("scrambled", "reference_scrambled"), ("plain", "reference_copy")):
        outs[name] = load(run_recipe(
            transfer(PREFIX + wrapped, bases[base], family["reference"], skills),
            tmp_path / name, random_seed=0,
        ))
    assert_tensors_close(outs["scrambled"], scrambled_like(outs["plain"], family, "reference_scrambled"))


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
    import mergekit_symalign.solve as solve

    calls = []
    real = solve.align_layer

    def counting(spec, reference, model, switches, label, **kwargs):
        calls.append(label)
        return real(spec, reference, model, switches, label=label, **kwargs)

    monkeypatch.setattr(solve, "align_layer", counting)
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
    # the card hook is installed from the .pth path too; the recipe is written as given
    assert "## Symmetry alignment (mergekit-symalign)" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == (tmp_path / "recipe.yml").read_text()


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


@pytest.mark.parametrize("params", [{"residual": "permutation"}, {"alignment": "activations"}])
def test_tokenizer_section_with_a_residual_transform(family_with_tokenizers, tmp_path, params):
    """Embeddings under a tokenizer section are moved by the residual stream's transform
    after mergekit's vocabulary permutation (AlignVocabularyTask, the method's input: it was
    refused by pydantic); with equal vocabularies the result is the merge without the section."""
    from .conftest import word_calibration

    fam = family_with_tokenizers
    if params.get("alignment") == "activations":
        params = {**params, "residual": "permutation", "calibration": word_calibration(tmp_path / "c.txt"),
                  "calibration_samples": 64, "calibration_max_tokens": 32}
    rec = transfer(PREFIX + "task_arithmetic", fam["sibling_scrambled"], fam["reference"],
                   [(fam["skill_scrambled"], {})], **params)
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


@pytest.mark.parametrize("frame", ["base", "reference"])
def test_bfloat16_checkpoints_end_to_end(family, tmp_path, frame):
    """bf16 checkpoints and a bf16 merge: the exact case holds to bf16 rounding (the
    transforms are solved and applied in float32 and rounded once, when saved)."""
    bf16 = {}
    for name in ("reference", "skill", "reference_scrambled"):
        state = {k: v.to(torch.bfloat16) for k, v in load(family[name]).items()}
        bf16[name] = save(state, family["config"], tmp_path / name, dtype=torch.bfloat16)
    out = run_recipe(
        transfer(PREFIX + "task_arithmetic", bf16["reference_scrambled"], bf16["reference"],
                 [(bf16["skill"], {"align": False})], dtype="bfloat16", output_frame=frame),
        tmp_path / "out",
    )
    merged = load(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    skill = {k: v.float() for k, v in load(bf16["skill"]).items()}
    want = scrambled_like(skill, family, "reference_scrambled") if frame == "base" else skill
    # bf16 keeps 8 bits of mantissa: one rounding of the inputs and one of the output
    assert_tensors_close({k: v.float() for k, v in merged.items()}, want, rtol=2e-2)


def test_bfloat16_transfer_is_rounded_once(family, tmp_path):
    """bf16 checkpoints: the wrapped method merges float32 deltas (SkillDeltas: on a zero base)
    with float32 weights, so the transferred model is the exact ``B + sum w_i (S_i - R)``
    rounded once to bf16 (within one unit in its last place), also where that sum nearly
    cancels and for weights that are no power of two. (mergekit's own bf16 merge rounds the
    weights and the deltas to bf16 first: off by hundreds of units where the sum cancels.)"""
    bf16 = {}
    for name in ("reference", "skill", "sibling"):
        state = {k: v.to(torch.bfloat16) for k, v in load(family[name]).items()}
        bf16[name] = save(state, family["config"], tmp_path / name, dtype=torch.bfloat16)
    copy = tmp_path / "reference_copy"  # the base: the reference's weights at another path
    shutil.copytree(bf16["reference"], copy)
    out = load(run_recipe(
        transfer(PREFIX + "task_arithmetic", str(copy), bf16["reference"],
                 [(bf16["skill"], {"align": False, "weight": 0.3}),
                  (bf16["sibling"], {"align": False, "weight": 0.45})], dtype="bfloat16"),
        tmp_path / "out"))
    plain = load(run_recipe(
        {"merge_method": "task_arithmetic", "base_model": bf16["reference"], "dtype": "bfloat16",
         "models": [{"model": bf16["skill"], "parameters": {"weight": 0.3}},
                    {"model": bf16["sibling"], "parameters": {"weight": 0.45}}]},
        tmp_path / "plain"))
    r, s1, s2 = (load(bf16[n]) for n in ("reference", "skill", "sibling"))

    def worst_ulps(merged):
        worst = 0.0
        for name, got in merged.items():
            exact = r[name].double() + 0.3 * (s1[name].double() - r[name].double()) \
                + 0.45 * (s2[name].double() - r[name].double())
            ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
            worst = max(worst, float(((got.double() - exact).abs() / ulp).max()))
        return worst

    assert worst_ulps(out) <= 1.0
    assert worst_ulps(plain) > 10.0  # the measure tells the two apart


def _save_gemma3_vlm(state, config, path):
    """A Gemma 3 vision-language checkpoint as on the Hub (mergekit's gemma3vl layout:
    ``vision_tower.vision_model.*``, ``language_model.model.*``)."""
    import transformers
    from safetensors.torch import save_file

    model = transformers.Gemma3ForConditionalGeneration(config)
    model.load_state_dict(state)
    model.save_pretrained(str(path), safe_serialization=True)
    tensors = load(str(path))
    hub = {("vision_tower.vision_model." + k[len("vision_tower."):]
            if k.startswith("vision_tower.") else k): v for k, v in tensors.items()}
    save_file(hub, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


def test_gemma3_multimodal_aligns_the_text_decoder_only(tmp_path):
    """Gemma 3 with a vision tower: the text decoder is aligned (its scramble undone); the
    vision tower's encoder layers are merged by the wrapped method, unaligned, as mergekit
    does, and never mistaken for decoder layers."""
    import transformers

    text = make_config("gemma3_text").to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        text.pop(key, None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    reference = transformers.Gemma3ForConditionalGeneration(config).state_dict()
    reference = {k: v + 0.1 * torch.randn_like(v) if "norm" in k else v for k, v in reference.items()}
    skill = perturbed(reference, seed=1)
    paths = {
        "reference": _save_gemma3_vlm(reference, config, tmp_path / "reference"),
        "skill": _save_gemma3_vlm(skill, config, tmp_path / "skill"),
        "base": _save_gemma3_vlm(scramble_state_dict(reference, config, seed=2)[0], config,
                                 tmp_path / "base"),
    }
    out = run_recipe(transfer(PREFIX + "task_arithmetic", paths["base"], paths["reference"],
                              [(paths["skill"], {"align": False})], output_frame="reference"),
                     tmp_path / "out")
    merged, want = load(out), load(paths["skill"])
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.") for k in merged)
    # (mergekit's gemma3vl definition omits the vision tower's unused pooling head)
    assert {k for k in want if "layers." in k} <= merged.keys()
    assert_tensors_close(merged, {k: want[k] for k in merged})


@pytest.mark.parametrize("dtypes,shape", [
    ((torch.bfloat16, torch.bfloat16), (37, 11)),  # several row blocks (small chunks below)
    ((torch.float16, torch.float16), (37, 11)),
    ((torch.bfloat16, torch.float32), (37, 11)),  # a float32 reference
    ((torch.float32, torch.bfloat16), (37, 11)),  # a float32 input: one pass
    ((torch.bfloat16, torch.bfloat16), (53,)),  # a norm's vector
    ((torch.bfloat16, torch.bfloat16), ()),
])
def test_skill_deltas_are_exact_widened_differences(monkeypatch, dtypes, shape):
    """SkillDeltas' ``S - R``: float32, equal to the float64 difference rounded once (exact
    for bf16/f16 inputs), whether widened whole or a block of rows at a time."""
    from mergekit_symalign import groups
    from mergekit_symalign.kernels import widened_difference

    monkeypatch.setattr(groups, "CHUNK_ELEMENTS", 32)  # 2 rows of 11 per block
    gen = torch.Generator().manual_seed(0)
    s, r = (torch.randn(shape, generator=gen).to(d) for d in dtypes)
    got = widened_difference(s, r)
    assert got.dtype == torch.float32 and got.shape == s.shape
    assert torch.equal(got, (s.double() - r.double()).float())


@pytest.mark.parametrize("residual,skill,nodes", [
    ("none", "skill", False),
    ("none", "skill_scrambled", False),  # an aligned skill: its AlignTensorTasks are fused too
    ("orthogonal", "skill", True),
])
def test_a_transfer_merges_inside_its_transfer_task(family, tmp_path, monkeypatch, residual, skill,
                                                    nodes):
    """mergekit's executor moves every task's inputs to the GPU and its result back to host
    memory: a transfer's float32 aligned skills, deltas and merged delta stay inside one task
    (AlignTensorTask, SkillDeltas and the wrapped method run in a FusedTransferTask), so only
    loaded tensors and the result cross. A residual: orthogonal refold shares a norm's merged
    delta between tasks: nodes there."""
    import mergekit.graph as graph

    seen = []
    real = graph.build_schedule

    def spy(targets, cached_values):
        schedule = real(targets, cached_values)
        seen.extend(type(handle.task()).__name__ for handle in schedule.tasks)
        return schedule

    monkeypatch.setattr(graph, "build_schedule", spy)
    aligned = skill == "skill_scrambled"
    recipe = transfer(PREFIX + "task_arithmetic", family["sibling_scrambled"], family["reference"],
                      [(family[skill], {"align": aligned})], residual=residual)
    out = load(run_recipe(recipe, tmp_path / "out"))
    assert seen.count("TransferTask") + seen.count("FusedTransferTask") == len(out)
    assert ("FusedTransferTask" in seen) and (("TransferTask" in seen) == nodes)
    for node in ("SkillDeltas", "ExecuteMergeMethodTask"):
        assert (node in seen) == nodes, node
    assert "AlignTensorTask" not in seen
    # the same merge, bit for bit, as the tasks as separate nodes
    import mergekit_symalign.planner as planner

    monkeypatch.setattr(planner, "FUSE", False)
    seen.clear()
    nodes_out = load(run_recipe(recipe, tmp_path / "nodes"))
    assert ("AlignTensorTask" in seen) == aligned and "SkillDeltas" in seen
    assert "FusedTransferTask" not in seen
    assert all(torch.equal(out[k], nodes_out[k]) for k in out)


@pytest.mark.parametrize("method,skill_params,params,dtype,direct", [
    ("task_arithmetic", {}, {}, "float32", True),
    ("task_arithmetic", {"weight": 0.5}, {}, "float32", True),
    ("task_arithmetic", {"weight": 0.7}, {"normalize": True, "lambda": 0.6}, "float32", True),
    ("task_arithmetic", {"weight": 1e-9}, {"normalize": True}, "float32", True),
    ("task_arithmetic", {"weight": 0.5}, {"lambda": 1.5}, "bfloat16", True),
    ("ties", {"weight": 0.5, "density": 0.5}, {}, "float32", False),
    ("task_arithmetic", "two skills", {}, "float32", False),
])
def test_single_skill_task_arithmetic_is_the_kernel_bit_for_bit(family, tmp_path, monkeypatch, method,
                                                               skill_params, params, dtype, direct):
    """A transfer of one skill with task_arithmetic skips mergekit's kernel
    (tasks.transfer.single_delta_task_arithmetic: the kernel's operations in place on the delta); the
    merged model must equal the kernel's bit for bit, and every other method or a second
    skill must still go through the kernel."""
    from mergekit_symalign.tasks import transfer as tasks

    calls = []
    real = tasks.single_delta_task_arithmetic

    def spy(task, deltas):
        out = real(task, deltas)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(tasks, "single_delta_task_arithmetic", spy)
    if skill_params == "two skills":
        skills = [(family["skill"], {"weight": 0.5}), (family["sibling"], {"weight": 0.25})]
    else:
        skills = [(family["skill"], skill_params)]
    recipe = transfer(PREFIX + method, family["sibling_scrambled"], family["reference"], skills,
                      dtype=dtype, **params)
    out = load(run_recipe(recipe, tmp_path / "direct"))
    assert calls and all(c == direct for c in calls)
    monkeypatch.setattr(tasks, "single_delta_task_arithmetic", lambda task, deltas: None)
    kernel = load(run_recipe(recipe, tmp_path / "kernel"))
    assert out.keys() == kernel.keys()
    assert all(torch.equal(out[k], kernel[k]) and out[k].dtype == kernel[k].dtype for k in out)
