"""Activation-based alignment: layer streaming, exact recovery of a scramble, bad input."""

import json

import pytest
import torch

from mergekit_symalign import groups
from mergekit_symalign.activations import (
    LayerStreamer,
    activation_plan,
    align_by_activations,
    full_forward_statistics,
    stream_statistics,
)
from mergekit_symalign.calibration import (
    DEFAULT_CALIBRATION,
    check_enough_tokens,
    load_calibration,
    tokenize_calibration,
)
from mergekit_symalign.groups import Kind, Site, Symmetry, slot_index
from mergekit_symalign.spec import Switches
from mergekit_symalign.statedict import scramble_state_dict, transform_state_dict

from .support import perturbed

from .conftest import ARCH_CONFIGS, VOCAB, make_model, scale_of

# 4 x 64 = 256 random calibration tokens >= intermediate_size (80) of the tiny models
IDS = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_rel_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) / (scale_of(b[k]) + 1e-12) for k in b)


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_activation_alignment_undoes_a_scramble(arch):
    model = make_model(arch, seed=5)
    sd = _state(model)
    scrambled, _ = scramble_state_dict(sd, model.config, seed=21)
    assert _max_rel_diff(scrambled, sd) > 0.1
    result = align_by_activations(sd.__getitem__, {"scrambled": scrambled.__getitem__},
                                  model.config, IDS, progress=False)
    assert sorted(result["scrambled"]) == list(range(model.config.num_hidden_layers))
    aligned = transform_state_dict(scrambled, model.config, result["scrambled"])
    assert _max_rel_diff(aligned, sd) < 1e-4


def test_each_switch_alone_is_solved_on_activations():
    model = make_model("qwen2", seed=6)
    sd = _state(model)
    for kind in ("permutation", "rotation", "scaling"):
        only = Switches(**{k: k == kind for k in ("permutation", "rotation", "scaling")})
        scrambled, _ = scramble_state_dict(sd, model.config, seed=4, switches=only)
        result = align_by_activations(sd.__getitem__, {"m": scrambled.__getitem__},
                                      model.config, IDS, switches=only, progress=False)
        steps = result["m"][0].steps
        assert steps and all(only.enabled(sym) for sym, _ in steps)
        aligned = transform_state_dict(scrambled, model.config, result["m"])
        assert _max_rel_diff(aligned, sd) < 1e-4, kind


def test_neuron_matching_survives_finetuning_and_negative_scales():
    """A fine-tuned relative, scrambled with signed neuron scales: neurons still matched."""
    model = make_model("llama", seed=7)
    reference = _state(model)
    relative = perturbed(model, seed=1, scale=0.02)
    scrambled, truth = scramble_state_dict(relative, model.config, seed=3)
    result = align_by_activations(reference.__getitem__, {"m": scrambled.__getitem__},
                                  model.config, IDS, progress=False)
    for layer, transform in result["m"].items():
        scale = dict((s.name, e) for s, e in truth[layer].steps)["mlp.neuron_scale"]
        assert (scale < 0).any()
        true_perm = dict((s.name, e) for s, e in truth[layer].steps)["mlp.neurons"]
        found = dict((s.name, e) for s, e in transform.steps)["mlp.neurons"]
        assert torch.equal(true_perm[found], torch.arange(len(found)))
    aligned = transform_state_dict(scrambled, model.config, result["m"])
    # back to the relative up to the fine-tuning noise (the scramble moved it by ~2.5)
    assert _max_rel_diff(aligned, relative) < 0.1


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])  # SwiGLU, GeGLU, fused gate_up
def test_neuron_matching_on_the_sketched_path_equals_the_dense_one(monkeypatch, arch):
    """Above assignment.DENSE_BELOW neurons the activation matching sketches the token
    dimension and scores candidate pairs only (forced here at test size): the same
    permutations as the dense cosines, the true ones, and fit margins that are never smaller
    than the dense path's (the tie check must still see a close competitor)."""
    from mergekit_symalign import assignment

    model = make_model(arch, seed=7)
    reference = _state(model)
    relative = perturbed(model, seed=1, scale=0.02)
    scrambled, truth = scramble_state_dict(relative, model.config, seed=3)
    runs = {}
    for below in (10_000, 0):
        monkeypatch.setattr(assignment, "DENSE_BELOW", below)
        paths, real = [], assignment.match

        def traced(*args, **kwargs):
            kwargs["info"] = info = {}
            out = real(*args, **kwargs)
            paths.append(info["path"])
            return out

        monkeypatch.setattr(assignment, "match", traced)
        report = []
        result = align_by_activations(reference.__getitem__, {"m": scrambled.__getitem__},
                                      model.config, IDS, progress=False, fit_report=report)
        monkeypatch.setattr(assignment, "match", real)
        runs[below] = (result["m"], report, paths)
    (dense, dense_report, dense_paths), (sketched, sketched_report, sketched_paths) = runs[10_000], runs[0]
    assert set(dense_paths) == {"dense"} and sketched_paths and set(sketched_paths) <= {"rowwise", "sparse"}
    for layer, transform in sketched.items():
        found = dict((s.name, e) for s, e in transform.steps)["mlp.neurons"]
        true_perm = dict((s.name, e) for s, e in truth[layer].steps)["mlp.neurons"]
        assert torch.equal(true_perm[found], torch.arange(len(found)))
        assert torch.equal(found, dict((s.name, e) for s, e in dense[layer].steps)["mlp.neurons"])
    for d, s in zip(dense_report, sketched_report):
        assert s.neuron_margin >= d.neuron_margin - 1e-6 and s.tied_neurons == d.tied_neurons


def test_fit_residuals_measure_the_moved_model():
    """The fit-quality residual compares the reference's activations with the model's as
    align_layer leaves them (``moved=``, which must equal applying the returned transform):
    ~0 for an exact scramble (the unmoved activations would be far off), clearly above it
    for a fine-tune."""
    from mergekit_symalign.spec import align_layer, random_transform
    from mergekit_symalign.statedict import spec_for_config

    model = make_model("llama", seed=8)
    spec = spec_for_config(model.config)
    layer = {k.split("layers.0.", 1)[1]: v for k, v in _state(model).items() if "layers.0." in k}
    target = random_transform(spec, torch.Generator().manual_seed(9)).apply(layer)
    moved = {}
    transform = align_layer(spec, layer, target, moved=moved)
    expected = transform.apply(target)
    assert moved.keys() == expected.keys()
    assert all(torch.equal(moved[k], expected[k]) for k in expected)
    assert _max_rel_diff(moved, layer) < 1e-4

    reference = _state(model)
    residuals = {}
    for name, other in (("exact", reference), ("fine-tune", perturbed(model, seed=2, scale=0.05))):
        scrambled, _ = scramble_state_dict(other, model.config, seed=4)
        report = []
        align_by_activations(reference.__getitem__, {"m": scrambled.__getitem__}, model.config,
                             IDS, progress=False, fit_report=report)
        residuals[name] = max(v for quality in report for v in quality.residual.values())
        assert {"mlp", "self_attn"} <= set(report[0].residual)
    assert residuals["exact"] < 1e-5 < 1e-3 < residuals["fine-tune"], residuals


def test_forward_cost_is_announced_and_warned_about_on_cpu(monkeypatch, caplog):
    """The activation alignment logs its forward passes' cost before it starts, and warns on a
    CPU above CPU_FORWARD_WARN_FLOP (with the remedy); the count is the linear layers'."""
    import logging

    from mergekit_symalign import activations
    from mergekit_symalign.architectures import Geometry

    smollm2 = Geometry("llama", 576, 9, 3, 64, 1536, 64, 100000.0)
    assert activations.forward_flop(smollm2, 30, 4096, 2) == 2 * 3538944 * 4096 * 30 * 2  # 1.74e12
    llama8b = Geometry("llama", 4096, 32, 8, 128, 14336, 128, 500000.0)
    assert 7.9e14 < activations.forward_flop(llama8b, 32, 2 * 14336, 2) < 8.1e14
    assert activations.forward_flop(llama8b, 32, 2 * 14336, 2) > activations.CPU_FORWARD_WARN_FLOP
    model = make_model("llama", seed=10)
    sd = _state(model)
    for limit, level in ((activations.CPU_FORWARD_WARN_FLOP, logging.INFO), (0.0, logging.WARNING)):
        monkeypatch.setattr(activations, "CPU_FORWARD_WARN_FLOP", limit)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=activations.LOG.name):
            align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config, IDS, progress=False)
        notes = [r for r in caplog.records if "TFLOP of forward passes" in r.getMessage()]
        assert len(notes) == 1 and notes[0].levelno == level
        assert f"over {IDS.numel()} calibration tokens" in notes[0].getMessage()
        assert ("--cuda" in notes[0].getMessage()) == (level == logging.WARNING)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])  # SwiGLU, GeGLU, fused gate_up
def test_mlp_records_feature_major_without_changing_the_layer(arch):
    """While recording, the MLP's input projections compute feature-major: the layer's
    output is the unhooked layer's, the records are the projections' outputs and down_proj's
    input, and the class forward is back afterwards."""
    from mergekit_symalign.activations import _Recorder

    model = make_model(arch, seed=11)
    plan = activation_plan(model.config)
    layer = model.base_model.layers[0]
    x = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(12))
    position_ids = torch.arange(16)[None].expand(2, -1)
    kwargs = dict(position_embeddings=model.base_model.rotary_emb(x, position_ids), attention_mask=None)

    def run():
        out = layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    seen = {}
    down = layer.get_submodule(plan.arch.down)
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0].clone())),
               down.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0].clone()))]
    with torch.no_grad():
        plain = run()
        recorder = _Recorder(layer, plan)
        patched = recorder.patched
        assert patched and all("forward" in vars(m) for m in patched)
        hooked = run()
        recorder.remove()
    for handle in handles:
        handle.remove()
    assert all("forward" not in vars(m) for m in patched)
    assert torch.allclose(hooked, plain, atol=1e-6, rtol=1e-5)
    acts = recorder.result()
    names = {m: n for n, m in layer.named_modules()}
    mlp_in = seen["mlp"].reshape(-1, x.shape[-1])
    for module in patched:
        expected = torch.nn.functional.linear(mlp_in, module.weight, module.bias).T
        assert torch.allclose(acts[f"{names[module]}:out"], expected, atol=1e-5, rtol=1e-4)
    recorded_h = acts[f"{plan.arch.down}:in"]
    assert recorded_h.is_contiguous()
    assert torch.allclose(recorded_h, seen["down"].reshape(-1, seen["down"].shape[-1]).T, atol=1e-6)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_streaming_statistics_equal_full_forward(arch):
    model = make_model(arch, seed=3)
    sd = _state(model)
    full = full_forward_statistics(model, IDS, batch_size=3)  # uneven chunks on purpose
    streamed = dict(stream_statistics(model.config, sd.__getitem__, IDS, batch_size=2))
    assert sorted(full) == sorted(streamed) == list(range(model.config.num_hidden_layers))
    for layer in full:
        assert full[layer].keys() == streamed[layer].keys()
        for key, value in full[layer].items():
            assert value.shape[1] == IDS.numel()
            assert torch.allclose(value, streamed[layer][key], rtol=1e-5, atol=1e-5), (layer, key)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_qk_norm_statistics_are_what_the_attention_sees(arch):
    """Recorded q/k of QK-norm models = the output of the model's own q_norm / k_norm."""
    model = make_model(arch, seed=2)
    seen = {}

    def keep(name):
        def hook(_module, _args, out):
            # Qwen3 normalizes [B, T, H, d], Gemma 3 [B, H, T, d] (after the transpose)
            out = out if out.shape[1] == IDS.shape[1] else out.transpose(1, 2)
            seen[name] = out.reshape(-1, out.shape[-2] * out.shape[-1]).T
        return hook

    attn = model.model.layers[1].self_attn
    handles = [attn.q_norm.register_forward_hook(keep("q")),
               attn.k_norm.register_forward_hook(keep("k"))]
    stats = full_forward_statistics(model, IDS, batch_size=len(IDS))[1]
    for handle in handles:
        handle.remove()
    assert torch.allclose(stats["self_attn.q_proj:normed"], seen["q"], atol=1e-6)
    assert torch.allclose(stats["self_attn.k_proj:normed"], seen["k"], atol=1e-6)


def test_full_qk_rotation_warns():
    model = make_model("llama", seed=2)
    sd = _state(model)
    with pytest.warns(UserWarning, match="NOT a symmetry"):
        align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config, IDS,
                             qk_rotation="full", progress=False)


def test_streamer_keeps_one_layer_resident_and_fetches_lazily():
    model = make_model("llama", seed=4)
    sd = _state(model)
    fetched = []

    def get_tensor(name):
        fetched.append(name)
        return sd[name]

    plan = activation_plan(model.config)
    streamer = LayerStreamer(model.config, get_tensor, IDS)
    assert not any(".layers." in name for name in fetched)  # embeddings only so far
    assert "lm_head.weight" not in fetched
    for index in range(streamer.num_layers):
        before = len(fetched)
        streamer.step(plan)
        names = fetched[before:]
        assert names and all(n.startswith(f"model.layers.{index}.") for n in names)
        resident = [n for n, p in streamer.model.named_parameters() if not p.is_meta]
        assert resident == [], resident  # the layer was freed again
    with pytest.raises(RuntimeError):
        streamer.step(plan)


# --------------------------------------------------------------------------- free scale


def test_free_scale_is_least_squares_and_guarded():
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(6, 40, generator=g, dtype=torch.float64)
    s = torch.tensor([2.0, -0.5, 3.0, 1.0, -4.0, 0.25], dtype=torch.float64)
    target = anchor / s[:, None]
    target[3] = 0.0  # a dead slot: falls back to 1
    site = Site("x", 0, slot_index(6, 1, 1))
    signed = Symmetry("free", Kind.scale, (site,), signed=True)
    found = groups.solve_continuous(signed, {"x": anchor}, {"x": target})
    expected = s.clone()
    expected[3] = 1.0
    assert torch.allclose(found, expected, rtol=1e-10)
    positive = Symmetry("free+", Kind.scale, (site,), signed=False)
    found = groups.solve_continuous(positive, {"x": anchor}, {"x": target})
    assert torch.equal(found[s < 0], torch.ones(int((s < 0).sum()), dtype=torch.float64))
    assert torch.allclose(found[s > 0], s[s > 0])
    nan = target.clone()
    nan[0, 0] = float("nan")
    assert float(groups.solve_continuous(signed, {"x": anchor}, {"x": nan})[0]) == 1.0


# --------------------------------------------------------------------------- calibration


def test_default_calibration_set():
    texts = load_calibration()
    assert len(texts) >= 600
    assert len(set(texts)) == len(texts)
    assert all(t.strip() == t and t for t in texts)
    assert load_calibration(samples=5) == texts[:5]
    assert DEFAULT_CALIBRATION.name == "calibration.jsonl"


def test_token_budget_keeps_whole_rows_of_the_first_prompts():
    from mergekit_symalign.calibration import default_token_budget

    assert default_token_budget(80) == 4096 and default_token_budget(14336, 128) == 28672
    toks = {"a": _tokenizer(WORDS)}
    texts = ["the cat sat on the mat", "a dog ran to the park"] * 50
    full = tokenize_calibration(toks, texts, max_tokens=8)
    cut = tokenize_calibration(toks, texts, max_tokens=8, budget=20)
    assert cut.shape == (3, 8) and torch.equal(cut, full[:3])


def test_user_calibration_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    assert load_calibration(txt) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert load_calibration(str(jsonl), samples=1) == ["a b"]


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "undecodable", "extension",
                                  "bad_json", "no_field"])
def test_bad_calibration_files(tmp_path, case):
    path = tmp_path / ("data.jsonl" if case in ("bad_json", "no_field") else "data.txt")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "blank":
        path.write_text("\n   \n\n")
    elif case == "undecodable":
        path.write_bytes(b"caf\xe9 au lait\n\xff\xfe broken\n")
    elif case == "extension":
        path = tmp_path / "data.csv"
        path.write_text("a,b\n")
    elif case == "bad_json":
        path.write_text('{"text": "ok"}\n{not json}\n')
    elif case == "no_field":
        path.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError) as info:
        load_calibration(path)
    message = str(info.value)
    assert str(path) in message
    assert ".jsonl" in message  # the remedy names the accepted formats
    expected = {"missing": "does not exist", "empty": "no prompts", "blank": "no prompts",
                "undecodable": "UTF-8", "extension": "extension", "bad_json": "line 2",
                "no_field": '"text"'}[case]
    assert expected in message
    with pytest.raises(ValueError, match="positive integer"):
        load_calibration(samples=-1)


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


WORDS = "the cat sat on a mat and dog ran to park".split()


def test_tokenize_calibration_packs_rows():
    toks = {"a": _tokenizer(WORDS), "b": _tokenizer(WORDS)}
    texts = ["the cat sat on the mat", "a dog ran to the park"] * 5
    ids = tokenize_calibration(toks, texts, max_tokens=8)
    assert ids.dtype == torch.long and ids.shape[1] == 8
    assert ids.shape[0] == (10 * 6 + 10) // 8  # 6 words + EOS per prompt, tail dropped
    assert int(ids.max()) < len(toks["a"].get_vocab())
    short = tokenize_calibration(toks, ["the cat"], max_tokens=64)
    assert short.shape == (1, 3)
    with pytest.raises(ValueError, match="positive integer"):
        tokenize_calibration(toks, texts, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        tokenize_calibration(toks, [], max_tokens=8)


def test_tokenizers_with_different_vocabularies_are_refused():
    toks = {"reference": _tokenizer(WORDS), "skill": _tokenizer(WORDS[::-1])}
    with pytest.raises(ValueError, match="'reference' and 'skill'.*different tokenizer vocab"):
        tokenize_calibration(toks, ["the cat sat"], max_tokens=8)
    toks["skill"] = _tokenizer(WORDS + ["extra"])
    with pytest.raises(ValueError, match="'reference' and 'skill'"):
        tokenize_calibration(toks, ["the cat sat"], max_tokens=8)


def test_too_few_tokens_and_bad_token_ids_are_refused():
    with pytest.raises(ValueError, match="needs at least 80 calibration tokens.*calibration_samples"):
        check_enough_tokens(10, 80, "the MLP neuron correlation")
    check_enough_tokens(80, 80, "fine")
    model = make_model("llama", seed=1)
    sd = _state(model)
    few = IDS[:1, :40]  # 40 tokens < 80 MLP neurons
    with pytest.raises(ValueError, match="needs at least 80 calibration tokens.*only 40"):
        align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config, few,
                             progress=False)
    # without the MLP symmetries only head_dim (12) tokens are needed
    rot = Switches(permutation=False, scaling=False)
    out = align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config, few,
                               switches=rot, progress=False)
    assert set(out["m"]) == {0, 1}
    with pytest.raises(ValueError, match="vocabulary"):
        align_by_activations(sd.__getitem__, {"m": sd.__getitem__}, model.config,
                             IDS + VOCAB, progress=False)
    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight.*missing"):
        align_by_activations(sd.__getitem__, {"broken": missing.__getitem__}, model.config, IDS,
                             progress=False)
