"""utils.loralib_tools against the real loralib and peft: layer swap, GQA slices, checkpoints, PEFT bridge."""

from __future__ import annotations

import warnings

import loralib as lora
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from utils.loralib_tools import (
    LoraAlreadyMergedError,
    LoraCheckpointError,
    LoraSettings,
    LoraShapeMismatchError,
    MissingLoraKeysError,
    SlicedMergedLinear,
    UnexpectedKeysError,
    add_lora,
    check_lora_state_dict,
    conv2d_with_lora,
    count_parameters,
    expected_lora_parameters,
    export_to_peft,
    load_lora_checkpoint,
    load_lora_state_dict,
    lora_layers,
    merged_linear_rows,
    peft_config_for,
    peft_tensors,
    read_lora_checkpoint,
    read_lora_settings,
    save_lora_checkpoint,
    sliced_rows,
)
from utils.phi3 import phi3_mini_config, qkv_widths, uses_grouped_query_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small matmuls: one thread, restored after each test

TOKENS = torch.tensor([[1, 17, 42, 99, 3, 64, 8, 120], [1, 5, 6, 7, 8, 9, 10, 11]])


def small_phi3(kv_heads: int = 4, tied: bool = False, seed: int = 0) -> Phi3ForCausalLM:
    """A random Phi-3 of a few hundred thousand parameters; kv_heads < 4 gives grouped-query attention."""
    config = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                        tie_word_embeddings=tied, sliding_window=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Phi3ForCausalLM(config).eval()


def lora_model(kv_heads: int = 4, tied: bool = False, settings: LoraSettings | None = None,
               seed: int = 1, trained: bool = True) -> Phi3ForCausalLM:
    """small_phi3 with loralib layers in train mode; ``trained`` makes B non-zero (as after training)."""
    model = small_phi3(kv_heads, tied)
    torch.manual_seed(seed)
    add_lora(model, settings or LoraSettings(r=2, alpha=4, dropout=0.0))
    lora.mark_only_lora_as_trainable(model)
    model.train()
    if trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(std=0.3)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    """Eval-mode logits on a fixed batch (eval merges loralib layers)."""
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


# ---------------------------------------------------------------------------------------------- swap


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["equal-qkv", "gqa"])
@pytest.mark.parametrize("embedding", [False, True], ids=["no-embedding", "embedding"])
def test_trainable_count_matches_formula_and_only_lora_trains(kv_heads: int, embedding: bool) -> None:
    settings = LoraSettings(r=4, alpha=8, embedding=embedding)
    model = small_phi3(kv_heads)
    total_before = count_parameters(model)[1]
    add_lora(model, settings)
    lora.mark_only_lora_as_trainable(model)
    trainable, total = count_parameters(model)
    assert trainable == sum(expected_lora_parameters(model.config, settings).values())
    assert total == total_before + trainable  # base weights re-used, not copied
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_formula_on_real_phi3_mini_shape() -> None:
    # r * (2 * 3072 in + 2 * 3072 out) + o r*(3072+3072) + gate_up r*(3072+16384) + down r*(8192+3072), 32 layers
    counts = expected_lora_parameters(phi3_mini_config(), LoraSettings(r=8))
    assert counts == {"qkv_proj": 32 * 98_304, "o_proj": 32 * 49_152, "gate_up_proj": 32 * 155_648,
                      "down_proj": 32 * 90_112}
    assert not uses_grouped_query_attention(phi3_mini_config())


def test_swap_reuses_pretrained_weights_and_starts_at_the_base_model() -> None:
    base = small_phi3(kv_heads=1)
    reference = logits(base)
    pointers = {n: p.data_ptr() for n, p in base.named_parameters()}
    report = add_lora(base, LoraSettings(r=2, alpha=4))
    assert report.grouped_query_attention and report.classes() == {"SlicedMergedLinear": 2, "Linear": 6}
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert param.data_ptr() == pointers[name], name
    torch.testing.assert_close(logits(base), reference, rtol=0, atol=0)  # B = 0: nothing changes


def test_equal_widths_use_loralibs_own_merged_linear() -> None:
    model = small_phi3(kv_heads=4)
    report = add_lora(model, LoraSettings(r=2, alpha=4))
    assert report.classes() == {"MergedLinear": 2, "Linear": 6}
    assert all(type(m) is lora.MergedLinear for n, m in lora_layers(model).items() if n.endswith("qkv_proj"))


def test_tied_embedding_keeps_the_tie_and_never_merges_into_the_head() -> None:
    model = lora_model(kv_heads=2, tied=True, settings=LoraSettings(r=2, alpha=4, embedding=True))
    head_before = model.lm_head.weight.detach().clone()
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, lora.Embedding) and embedding.weight is model.lm_head.weight
    model.eval()
    assert not embedding.merged
    torch.testing.assert_close(model.lm_head.weight, head_before, rtol=0, atol=0)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="Unknown Phi-3 target"):
        LoraSettings(targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="qkv_slices"):
        LoraSettings(qkv_slices=(False, False, False))
    assert LoraSettings.from_json(LoraSettings(r=3, embedding=True).to_json()) == LoraSettings(r=3, embedding=True)


def test_add_lora_names_the_problem_on_a_non_phi3_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = Phi3Config()
    with pytest.raises(ValueError, match="No module named"):
        add_lora(model, LoraSettings(targets=("o_proj",)))


def test_add_lora_refuses_quantized_linear_layers() -> None:
    class Linear4bitStandIn(torch.nn.Linear):
        pass

    model = small_phi3()
    model.model.layers[0].self_attn.o_proj = Linear4bitStandIn(32, 32, bias=False)
    with pytest.raises(TypeError, match="Linear4bitStandIn, not a plain nn.Linear"):
        add_lora(model, LoraSettings(r=2))


def test_conv2d_with_lora_starts_equal_and_merges_exactly() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    images = torch.randn(2, 3, 8, 8)
    wrapped = conv2d_with_lora(conv, r=2, alpha=4)
    torch.testing.assert_close(wrapped(images), conv(images), rtol=0, atol=0)
    lora.mark_only_lora_as_trainable(wrapped)
    assert count_parameters(wrapped)[0] == 2 * 3 * 3 * (3 + 5)  # r * k^2 * (in + out)
    with torch.no_grad():
        wrapped.lora_B.normal_()
    unmerged = wrapped(images)
    assert not torch.allclose(unmerged, conv(images))
    wrapped.eval()
    torch.testing.assert_close(wrapped(images), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="square kernel"):
        conv2d_with_lora(torch.nn.Conv2d(3, 5, kernel_size=(1, 3)), r=2, alpha=4)


# ----------------------------------------------------------------------------------------------- GQA


def test_loralib_merged_linear_splits_gqa_in_the_wrong_place() -> None:
    widths, enable = (576, 192, 192), (True, False, True)  # SmolLM2: 9 query heads, 3 key/value heads
    wrong, right = merged_linear_rows(sum(widths), enable), sliced_rows(widths, enable)
    assert wrong[576:768].any()  # loralib would update k rows 640-767 ...
    assert not wrong[:576].all()  # ... and miss q rows 320-575
    assert right[:576].all() and not right[576:768].any() and right[768:].all()
    with pytest.raises(AssertionError, match="divide out_features"):
        lora.MergedLinear(8, 12 + 4 + 4, r=2, enable_lora=[True, False, True])  # 20 rows, 3 slices
    with pytest.raises(ValueError, match="refuses"):
        merged_linear_rows(20, enable)


def test_sliced_update_lands_only_on_q_and_v_rows() -> None:
    torch.manual_seed(0)
    layer = SlicedMergedLinear(8, (12, 4, 4), r=2, lora_alpha=4, enable_lora=[True, False, True])
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.merge_AB()
    a_q, a_v = layer.lora_A.split(2)
    b_q, b_v = layer.lora_B.split([12, 4])
    torch.testing.assert_close(delta[:12], b_q @ a_q)
    assert torch.count_nonzero(delta[12:16]) == 0
    torch.testing.assert_close(delta[16:], b_v @ a_v)
    x = torch.randn(3, 8)
    expected = x @ (layer.weight + 2.0 * delta).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.eval()  # loralib's merge uses our merge_AB
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_sliced_equals_loralib_merged_linear_when_widths_are_equal() -> None:
    torch.manual_seed(0)
    ours = SlicedMergedLinear(8, (6, 6, 6), r=2, lora_alpha=4, enable_lora=[True, False, True])
    theirs = lora.MergedLinear(8, 18, r=2, lora_alpha=4, enable_lora=[True, False, True])
    with torch.no_grad():
        ours.lora_B.normal_()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.merge_AB(), theirs.merge_AB())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_in_a_gqa_model_the_key_states_are_untouched() -> None:
    model = lora_model(kv_heads=1)
    q_width, k_width, _ = qkv_widths(model.config)
    layer = model.model.layers[0].self_attn.qkv_proj
    hidden = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        adapted, base = layer(hidden), torch.nn.functional.linear(hidden, layer.weight)
    torch.testing.assert_close(adapted[..., q_width:q_width + k_width], base[..., q_width:q_width + k_width])
    assert not torch.allclose(adapted[..., :q_width], base[..., :q_width])
    assert not torch.allclose(adapted[..., q_width + k_width:], base[..., q_width + k_width:])


# --------------------------------------------------------------------------------------- checkpoints


def test_checker_accepts_a_lora_state_dict_and_the_load_restores_outputs() -> None:
    trained = lora_model(kv_heads=1)
    state = lora.lora_state_dict(trained)
    fresh = lora_model(kv_heads=1, seed=7, trained=False)
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh), logits(trained))


def test_checker_missing_lora_keys() -> None:
    model = lora_model()
    state = lora.lora_state_dict(model)
    state.pop(next(k for k in state if k.endswith("o_proj.lora_B")))
    with pytest.raises(MissingLoraKeysError, match="lacks 1 LoRA tensor.*o_proj.lora_B"):
        check_lora_state_dict(model, state, source="ckpt.safetensors")
    narrower = lora_model(settings=LoraSettings(r=2, alpha=4, targets=("qkv_proj",)))
    with pytest.raises(MissingLoraKeysError):
        check_lora_state_dict(model, lora.lora_state_dict(narrower))


def test_checker_unexpected_keys() -> None:
    model = lora_model(settings=LoraSettings(r=2, alpha=4, targets=("qkv_proj",)))
    wider = lora.lora_state_dict(lora_model())
    with pytest.raises(UnexpectedKeysError, match="does not have.*o_proj"):
        check_lora_state_dict(model, wider)
    peft_style = {f"base_model.model.{k}": v for k, v in lora.lora_state_dict(model).items()}
    with pytest.raises(UnexpectedKeysError, match="PeftModel.from_pretrained"):
        check_lora_state_dict(model, peft_style)


def test_checker_shape_mismatch() -> None:
    model = lora_model(settings=LoraSettings(r=2, alpha=4))
    other_rank = lora.lora_state_dict(lora_model(settings=LoraSettings(r=4, alpha=8)))
    with pytest.raises(LoraShapeMismatchError, match=r"16 tensor.*down_proj.lora_A: checkpoint \(4, 64\) vs model \(2, 64\)"):
        check_lora_state_dict(model, other_rank)


def test_checker_refuses_empty_and_merged() -> None:
    model = lora_model()
    with pytest.raises(LoraCheckpointError, match="empty"):
        check_lora_state_dict(model, {})
    state = lora.lora_state_dict(model)
    model.eval()
    with pytest.raises(LoraAlreadyMergedError, match="eval"):
        check_lora_state_dict(model, state)


def test_the_eval_merge_trap_is_real_in_loralib() -> None:
    trained = lora_model()
    state, trained_logits = lora.lora_state_dict(trained), logits(trained)
    careless = lora_model(seed=7, trained=False)
    base_logits = logits(careless)  # eval() merges the zero update ...
    careless.load_state_dict(state, strict=False)  # ... so this load is silently ignored
    torch.testing.assert_close(logits(careless), base_logits)
    assert not torch.allclose(logits(careless), trained_logits)


def test_safetensors_round_trip_with_settings(tmp_path) -> None:
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    trained = lora_model(kv_heads=2, settings=settings)
    path = save_lora_checkpoint(trained, tmp_path / "lora.safetensors", settings)
    assert set(read_lora_checkpoint(path)) == set(lora.lora_state_dict(trained))
    assert read_lora_settings(path) == settings
    fresh = lora_model(kv_heads=2, settings=read_lora_settings(path), seed=9, trained=False)
    load_lora_checkpoint(fresh, path)
    torch.testing.assert_close(logits(fresh), logits(trained))


def test_torch_save_form_loads_only_plain_tensors(tmp_path) -> None:
    trained = lora_model()
    path = tmp_path / "lora.pt"
    torch.save(lora.lora_state_dict(trained), path)  # the seed's form
    fresh = lora_model(seed=3, trained=False)
    load_lora_checkpoint(fresh, path)
    torch.testing.assert_close(logits(fresh), logits(trained))
    torch.save({"weights": lora.lora_state_dict(trained), "optimizer": torch.optim.SGD}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):  # weights_only=True refuses pickled code
        read_lora_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="No LoRA checkpoint"):
        read_lora_checkpoint(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------- PEFT bridge


@pytest.mark.parametrize(("kv_heads", "tied", "embedding"), [(4, False, False), (1, False, True), (2, True, False)],
                         ids=["equal-qkv", "gqa+embedding", "gqa-tied"])
def test_peft_adapter_reproduces_the_loralib_model(tmp_path, kv_heads: int, tied: bool, embedding: bool) -> None:
    from peft import PeftModel

    settings = LoraSettings(r=2, alpha=6, dropout=0.1, embedding=embedding)
    trained = lora_model(kv_heads, tied, settings)
    folder = export_to_peft(trained, tmp_path / "adapter", base_model_name_or_path="small-phi3")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(small_phi3(kv_heads, tied), folder)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert peft_model.peft_config["default"].lora_dropout == 0.1
    torch.testing.assert_close(logits(peft_model), logits(trained), rtol=1e-4, atol=1e-5)


def test_peft_keys_and_shapes_are_what_peft_itself_saves() -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    trained = lora_model(kv_heads=1, settings=LoraSettings(r=2, alpha=4, embedding=True))
    config = peft_config_for(trained)
    assert config.rank_pattern == {"qkv_proj": 4} and config.alpha_pattern == {"qkv_proj": 8}  # 2 slices x r, x alpha
    native_model = get_peft_model(small_phi3(kv_heads=1), config)
    native = get_peft_model_state_dict(native_model, save_embedding_layers=False)  # not the full embedding copy
    ours = peft_tensors(trained)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in native.items()}


def test_peft_block_structure_has_zero_k_rows() -> None:
    trained = lora_model(kv_heads=1)
    q_width, k_width, _ = qkv_widths(trained.config)
    b = peft_tensors(trained)["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert b.shape == (sum(qkv_widths(trained.config)), 4)
    assert torch.count_nonzero(b[:q_width, 2:]) == 0 and torch.count_nonzero(b[q_width + k_width:, :2]) == 0
    assert torch.count_nonzero(b[q_width:q_width + k_width]) == 0


def test_peft_export_of_part_of_the_layers_targets_full_names() -> None:
    model = small_phi3()
    torch.manual_seed(0)
    layer = model.model.layers[1].mlp.down_proj
    from utils.loralib_tools import linear_with_lora

    model.model.layers[1].mlp.down_proj = linear_with_lora(layer, LoraSettings(r=2, alpha=4))
    assert peft_config_for(model).target_modules == {"model.layers.1.mlp.down_proj"}
