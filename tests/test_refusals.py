"""The refusal matrix (issue 12): every bad or unusual input the plugin must refuse, the message
it must give, and that a refused merge leaves no output folder behind (nor deletes one that
existed before).

Each case names the bad input; ``refused`` runs it through mergekit's ``run_merge`` (the
``mergekit-yaml`` cases through an unmodified ``mergekit-yaml`` subprocess) and checks the
error's type and message.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_symalign.errors import (
    NonFiniteTensorError,
    SymAlignConfigError,
    UndeterminedAlignment,
)
from mergekit_symalign.methods import PREFIX

from .support import aligned_recipe, run_mergekit_yaml, run_recipe

from .conftest import VOCAB, make_config, make_model, save, save_word_tokenizer, word_calibration


def recipe(family, **params):
    """Skill vectors of ``skill - reference`` onto the sibling (every model aligned)."""
    return aligned_recipe(PREFIX + "task_arithmetic", family["sibling"], family["reference"],
                          [family["skill"]], **params)


def refused(rec, out: Path, error=SymAlignConfigError, match=None, **options) -> str:
    with pytest.raises(error, match=match) as info:
        run_recipe(rec, out, **options)
    assert not out.exists(), "a refused merge must leave no output folder behind"
    return str(info.value)


def edited_copy(src: str, dst: Path, edit=None, config=None) -> str:
    """A copy of a model folder with its tensors edited (and/or another config.json)."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(f"{dst}/model.safetensors")
        edit(tensors)
        save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    if config is not None:
        config.save_pretrained(str(dst))
    return str(dst)


def poison(name, value=float("nan")):
    def edit(tensors):
        tensors[name].view(-1)[3] = value
    return edit


def digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- 1. NaN / Inf anywhere


@pytest.mark.parametrize("role,tensor,value", [
    ("skill", "model.layers.0.input_layernorm.weight", float("nan")),  # a layer norm
    ("skill", "model.norm.weight", float("nan")),  # the final norm
    ("skill", "model.embed_tokens.weight", float("inf")),  # embeddings
    ("reference", "lm_head.weight", float("-inf")),  # lm_head of the reference
    ("unaligned", "model.layers.1.mlp.down_proj.weight", float("nan")),  # an `align: false` model
    ("base", "model.layers.1.self_attn.v_proj.weight", float("nan")),  # aligned layer tensor
    # the reference's layer tensors are checked by the layer alignments that read them, its
    # norms (which they do not read) by the transfer
    ("reference", "model.layers.1.mlp.up_proj.weight", float("nan")),
    ("reference", "model.layers.0.post_attention_layernorm.weight", float("inf")),
])
def test_non_finite_weight_anywhere_is_refused(family, tmp_path, role, tensor, value):
    source = {"skill": "skill", "unaligned": "skill", "reference": "reference", "base": "sibling"}[role]
    broken = edited_copy(family[source], tmp_path / "broken", poison(tensor, value))
    rec = recipe(family)
    if role == "base":
        rec["base_model"] = broken
    elif role == "reference":
        rec["models"][0]["model"] = broken
    else:
        rec["models"][1]["model"] = broken
        if role == "unaligned":
            rec["models"][1]["parameters"]["align"] = False
    msg = refused(rec, tmp_path / "out", NonFiniteTensorError)
    assert broken in msg and tensor in msg and "NaN/Inf" in msg


def test_every_input_tensor_is_checked_once(family, tmp_path, monkeypatch):
    """Each tensor of each model the merge reads is summed for NaN/Inf exactly once: the
    layer alignments check what they load (the aligned models' and the reference's layer
    tensors: one load, shared by the base's and the skill's alignments), the transfer the
    rest (norms, embeddings)."""
    from mergekit_symalign import validation

    seen = {}
    real = validation._check_values

    def counting(tensor, model, name):
        seen[(str(model), name)] = seen.get((str(model), name), 0) + 1
        return real(tensor, model, name)

    monkeypatch.setattr(validation, "_check_values", counting)
    run_recipe(recipe(family), tmp_path / "out")
    names = list(load_file(f"{family['reference']}/model.safetensors"))
    models = (family["sibling"], family["reference"], family["skill"])
    assert set(seen) == {(m, n) for m in models for n in names}
    assert set(seen.values()) == {1}, sorted(k for k, v in seen.items() if v > 1)


def test_non_finite_embeddings_under_a_tokenizer_section(family_with_tokenizers, tmp_path):
    fam = family_with_tokenizers
    broken = edited_copy(fam["skill"], tmp_path / "broken", poison("model.embed_tokens.weight"))
    rec = recipe(fam)
    rec["models"][1]["model"] = broken
    rec["tokenizer"] = {"source": "base"}
    msg = refused(rec, tmp_path / "out", NonFiniteTensorError)
    assert broken in msg and "model.embed_tokens.weight" in msg


def test_non_finite_weight_streamed_by_activation_alignment(family_with_tokenizers, tmp_path):
    fam = family_with_tokenizers
    broken = edited_copy(fam["skill"], tmp_path / "broken",
                         poison("model.layers.0.post_attention_layernorm.weight"))
    rec = recipe(fam, alignment="activations", calibration=word_calibration(tmp_path / "c.txt"))
    rec["models"][1]["model"] = broken
    msg = refused(rec, tmp_path / "out", NonFiniteTensorError)
    assert broken in msg and "model.layers.0.post_attention_layernorm.weight" in msg


def test_refusal_during_execution_keeps_a_folder_that_existed(family, tmp_path):
    broken = edited_copy(family["skill"], tmp_path / "broken", poison("model.norm.weight"))
    rec = recipe(family)
    rec["models"][1]["model"] = broken
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(NonFiniteTensorError):
        run_recipe(rec, out)
    assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 2. degenerate calibration


def test_degenerate_calibration_is_refused_naming_layer_and_remedy(family_with_tokenizers, tmp_path):
    """200 copies of one short line: the values of layer 0 span 7 of 12 head dimensions,
    so the V/O rotation is not determined (the merge would be silently wrong)."""
    fam = family_with_tokenizers
    calib = tmp_path / "repeat.txt"
    calib.write_text("w1 w2 w3 w4 w5 w6\n" * 200)
    msg = refused(recipe(fam, alignment="activations", calibration=str(calib)), tmp_path / "out",
                  UndeterminedAlignment)
    assert "layer 0" in msg and "attn.vo_rotation" in msg and "conditioning" in msg
    assert "more varied calibration set" in msg and "alignment: weights" in msg


def test_calibration_of_unknown_tokens_is_refused_at_plan_time(family_with_tokenizers, tmp_path):
    fam = family_with_tokenizers
    calib = tmp_path / "unknown.txt"
    calib.write_text("zz qq xx yy w1 w2 zz qq\n" * 100)
    msg = refused(recipe(fam, alignment="activations", calibration=str(calib)), tmp_path / "out",
                  match="75% of the calibration tokens are the tokenizer's unknown token")
    assert "[UNK]" in msg


def test_fit_quality_is_in_the_merge_log(family_with_tokenizers, tmp_path, caplog):
    fam = family_with_tokenizers
    rec = recipe(fam, alignment="activations", calibration=word_calibration(tmp_path / "c.txt"))
    with caplog.at_level("INFO", logger="mergekit_symalign"):
        run_recipe(rec, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "activation alignment fit" in r.getMessage()]
    assert len(lines) == 2 * 2  # two layers of the two aligned models (base, skill)
    assert all("residual" in x and " mlp " in x and "neuron margin" in x and "attn.vo_rotation" in x
               for x in lines)


# --------------------------------------------------------------------------- 3. output into an input


@pytest.mark.parametrize("where", ["reference", "inside_skill"])
def test_output_into_an_input_models_folder(family, tmp_path, where):
    folders = {name: edited_copy(family[name], tmp_path / name) for name in ("reference", "skill")}
    rec = aligned_recipe(PREFIX + "task_arithmetic", family["sibling"], folders["reference"],
                         [folders["skill"]])
    out = Path(folders["reference"]) if where == "reference" else Path(folders["skill"]) / "merged"
    before = {name: digest(folder) for name, folder in folders.items()}
    with pytest.raises(SymAlignConfigError, match="input model") as info:
        run_recipe(rec, out)
    assert "Choose an output folder outside" in str(info.value)
    assert {name: digest(folder) for name, folder in folders.items()} == before
    assert where == "reference" or not out.exists()


# --------------------------------------------------------------------------- 4. vocabulary size


def test_base_with_another_vocabulary_size(family, tmp_path):
    sd = load_file(f"{family['sibling']}/model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.zeros(1, sd[name].shape[1])])
    bigger = save(sd, make_config("llama", vocab_size=VOCAB + 1), tmp_path / "bigger")
    rec = recipe(family)
    rec["base_model"] = bigger
    msg = refused(rec, tmp_path / "out", match="vocabulary size mismatch")
    assert f"base model {bigger} has {VOCAB + 1}" in msg and f"has {VOCAB} tokens" in msg
    assert "tokenizer: {source: base}" in msg


# --------------------------------------------------------------------------- 5., 6. parameters


@pytest.mark.parametrize("stray", ["calibration", "calibration_samples", "calibration_max_tokens"])
def test_calibration_settings_with_weight_alignment(family, tmp_path, stray):
    value = {"calibration": "x.txt", "calibration_samples": 10, "calibration_max_tokens": 64}[stray]
    msg = refused(recipe(family, **{stray: value}), tmp_path / "out",
                  match="only used by alignment: activations")
    assert stray in msg


@pytest.mark.parametrize("value", ["maybe", 2])
def test_boolean_parameter_with_a_wrong_value(family, tmp_path, value):
    msg = refused(recipe(family, permutation=value), tmp_path / "out",
                  match="parameter permutation in parameters must be true or false")
    assert repr(value) in msg


def test_wrong_value_and_missing_folder_through_mergekit_yaml(family, tmp_path):
    """Through an unmodified mergekit-yaml: the parameter and the missing folder are named."""
    for name, rec, expected in (
        ("bool", recipe(family, permutation="maybe"), "parameter permutation in parameters must be true or false"),
        ("path", {**recipe(family), "base_model": str(tmp_path / "no" / "such" / "model")},
         f"the model folder {tmp_path / 'no' / 'such' / 'model'} does not exist"),
    ):
        with pytest.raises(RuntimeError) as info:
            run_mergekit_yaml(rec, tmp_path / f"{name}.yml", tmp_path / f"out_{name}")
        assert expected in str(info.value)
        assert "Repo id must be in the form" not in str(info.value)
        assert not (tmp_path / f"out_{name}").exists()


# --------------------------------------------------------------------------- 7. missing local folder


@pytest.mark.parametrize("path", ["/definitely/not/here", "./not-here/model", "../not-here"])
def test_missing_local_model_folder(family, tmp_path, path):
    rec = recipe(family)
    rec["models"][1]["model"] = path
    msg = refused(rec, tmp_path / "out", match=f"the model folder {path} does not exist")
    assert "current directory" in msg


def test_missing_folder_of_a_plain_mergekit_method_is_left_to_mergekit(family, tmp_path):
    rec = {"merge_method": "task_arithmetic", "base_model": family["reference"],
           "models": [{"model": "/definitely/not/here", "parameters": {"weight": 1.0}}]}
    with pytest.raises(Exception) as info:
        run_recipe(rec, tmp_path / "out")
    assert not isinstance(info.value, SymAlignConfigError)


# --------------------------------------------------------------------------- 8. refused at plan time


def test_calibration_max_tokens_zero(family_with_tokenizers, tmp_path):
    refused(recipe(family_with_tokenizers, alignment="activations", calibration_max_tokens=0),
            tmp_path / "out", match="calibration_max_tokens must be a positive integer, got 0")


def test_too_few_calibration_tokens(family_with_tokenizers, tmp_path):
    rec = recipe(family_with_tokenizers, alignment="activations", calibration_samples=1,
                 calibration=word_calibration(tmp_path / "c.txt"))
    refused(rec, tmp_path / "out", match="needs at least 80 calibration tokens.*only 25")


def test_tokenizers_that_differ_between_models(family_with_tokenizers, tmp_path):
    fam = family_with_tokenizers
    other = edited_copy(fam["skill"], tmp_path / "other")
    save_word_tokenizer(other, vocab_size=VOCAB - 1)
    rec = recipe(fam, alignment="activations", calibration=word_calibration(tmp_path / "c.txt"))
    rec["models"][1]["model"] = other
    msg = refused(rec, tmp_path / "out", match="different tokenizer vocabularies")
    assert other in msg


def test_model_without_tokenizer(family, tmp_path):
    msg = refused(recipe(family, alignment="activations"), tmp_path / "out",
                  match="cannot load its tokenizer")
    assert "alignment: weights" in msg


# --------------------------------------------------------------------------- 9. configs that compute differently


@pytest.mark.parametrize("arch,change,field", [
    ("llama", dict(rms_norm_eps=1e-5), "norm epsilon"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_parameters"),
    ("gemma2", dict(attn_logit_softcapping=10.0), "attn_logit_softcapping"),
])
def test_configs_that_compute_differently(tmp_path, arch, change, field):
    config = make_config(arch)
    model = make_model(arch, seed=0)
    base = save(model, config, tmp_path / "base")
    other = save(model, make_config(arch, **change), tmp_path / "other")
    rec = {"merge_method": PREFIX + "task_arithmetic", "base_model": base, "dtype": "float32",
           "models": [{"model": other, "parameters": {"weight": 1.0}}],
           "parameters": {"alignment": "activations"}}
    msg = refused(rec, tmp_path / "out", match=f"differ in {field}")
    assert other in msg and "share one configuration" in msg


def test_configs_that_compute_differently_warn_when_aligned_by_weights(tmp_path, caplog):
    """Aligned by weights the symmetries do not depend on the setting, and mergekit merges
    such models too: the merge goes on, with a warning that names the difference."""
    config = make_config("llama")
    model = make_model("llama", seed=0)
    base = save(model, config, tmp_path / "base")
    other = save(model, make_config("llama", rms_norm_eps=1e-5), tmp_path / "other")
    rec = {"merge_method": PREFIX + "task_arithmetic", "base_model": base, "dtype": "float32",
           "models": [{"model": other, "parameters": {"weight": 1.0}}]}
    with caplog.at_level("WARNING"):
        run_recipe(rec, tmp_path / "out")
    assert "differ in norm epsilon" in caplog.text


def test_each_model_streams_with_its_own_config(monkeypatch):
    from mergekit_symalign import activations

    seen = {}
    real = activations.LayerStreamer

    class Spy(real):
        def __init__(self, config, get_tensor, token_ids, *args, name="model", **kw):
            seen[name] = config
            super().__init__(config, get_tensor, token_ids, *args, name=name, **kw)

    monkeypatch.setattr(activations, "LayerStreamer", Spy)
    model = make_model("llama", seed=1)
    sd = model.state_dict()
    own = make_config("llama", rms_norm_eps=1e-5)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    activations.align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config, ids,
                                     progress=False, model_configs={"m": own})
    assert seen["reference"] is model.config and seen["m"] is own


# --------------------------------------------------------------------------- 10. default calibration at 8B width


@pytest.fixture(scope="module")
def smollm2_tokenizer_folder(tmp_path_factory):
    smollm = pytest.importorskip("examples.smollm")
    try:
        _model, tokenizer = smollm.load_smollm2(torch.float32)
    except smollm.SmolLM2Missing as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("smol_tok")
    tokenizer.save_pretrained(str(folder))
    return folder, len(tokenizer)


def _wide_family(root: Path, tokenizer, vocab: int, intermediate: int):
    """A tiny Llama of ``intermediate`` MLP neurons with a real tokenizer, and its scramble."""
    from mergekit_symalign.statedict import scramble_state_dict

    config = make_config("llama", vocab_size=vocab, hidden_size=16, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, intermediate_size=intermediate,
                         num_hidden_layers=1, bos_token_id=1, eos_token_id=2)
    model = make_model("llama", seed=0, **{k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "num_hidden_layers")})
    sd = model.state_dict()
    paths = {"reference": save(sd, config, root / "reference"),
             "skill": save(dict(sd), config, root / "skill"),
             "scrambled": save(scramble_state_dict(sd, config, seed=3)[0], config, root / "scrambled")}
    for p in paths.values():
        for f in Path(tokenizer).iterdir():
            shutil.copy(f, p)
    return paths


def test_default_calibration_is_accepted_at_plan_time_at_8b_width(smollm2_tokenizer_folder, tmp_path):
    """intermediate_size 14336 (Llama-3-8B): the default calibration passes the plan-time
    token check (2 x 14336 tokens), planned without executing."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_symalign.calibration import calibration_tokens

    folder, vocab = smollm2_tokenizer_folder
    paths = _wide_family(tmp_path, folder, vocab, 14336)
    rec = aligned_recipe(PREFIX + "task_arithmetic", paths["scrambled"], paths["reference"],
                         [(paths["skill"], {"align": False})], alignment="activations")
    config = MergeConfiguration.model_validate(rec)
    reference, base = config.models[0].model, config.base_model
    options = MergeOptions()
    planner = MergePlanner(config, get_architecture_info(config, options), options, base.config())
    assert planner.plan_to_disk(str(tmp_path / "out"))  # the checks passed
    assert not (tmp_path / "out").exists()
    # what the plan-time check tokenized (cached): the default's budget for this width
    ids = calibration_tokens(reference, (base,), None, 0, 128)
    assert ids.numel() >= 2 * 14336


def test_default_calibration_recovers_an_exact_case(smollm2_tokenizer_folder, tmp_path):
    """A scrambled copy aligned by activations on the default calibration (no calibration
    settings at all): the transfer reproduces the skill model exactly."""
    from .conftest import logits

    folder, vocab = smollm2_tokenizer_folder
    paths = _wide_family(tmp_path, folder, vocab, 2048)
    rec = aligned_recipe(PREFIX + "task_arithmetic", paths["scrambled"], paths["reference"],
                         [(paths["skill"], {"align": False})], alignment="activations",
                         output_frame="reference")
    out = run_recipe(rec, tmp_path / "out")
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    want = logits(paths["skill"], ids)
    assert float((logits(out, ids) - want).abs().max()) <= 1e-4 * float(want.abs().max())
