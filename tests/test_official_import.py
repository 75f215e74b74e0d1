"""Importing the authors' checkpoints: exact outputs, inferred config, and every way a file can be wrong."""
from __future__ import annotations

import pytest
import torch

from authors_layout import reference_forward
from conftest import save_torchscript
from ipiqa.checkpoint import load_model, save_model
from ipiqa.errors import CheckpointError
from ipiqa.export.parity import compare
from ipiqa.model import tokenize
from ipiqa.official import convert_official, import_official, read_clip_base, read_official_finetuned

PROMPTS = ["a photo of a cat wearing a hat", "statue of a man, oil painting " * 20]


def _images(resolution: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def _scores_after_import(ft_path, clip_path, tmp_path, resolution):
    cfg, sd = import_official(ft_path, clip_path)
    path = save_model(tmp_path / "model.safetensors", sd, cfg)
    model = load_model(path)
    with torch.no_grad():
        return cfg, model(_images(resolution), tokenize(PROMPTS))


def _float64(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _assert_matches_spec(ours: torch.Tensor, ft: dict, clip: dict, resolution: int) -> None:
    """The gate's FP32 rule against the spec's forward: ``max(1e-4 x max(1, score range), k x floor)``, the floor
    being the spec forward's own FP32 error (float32 against float64, here, on this machine's kernels)."""
    with torch.no_grad():
        ref = reference_forward(ft, clip, _images(resolution), tokenize(PROMPTS))
        ref64 = reference_forward(_float64(ft), _float64(clip), _images(resolution).double(), tokenize(PROMPTS))
    result = compare("scores", ref.numpy(), ours.numpy(), scores=True, ref64=ref64.numpy())
    assert result, result.line()


def test_import_matches_spec_forward_at_512_two_outputs_mlp(authors_512, tmp_path):
    ft_path, clip_path, ft, clip = authors_512
    cfg, ours = _scores_after_import(ft_path, clip_path, tmp_path, 512)
    assert (cfg.resolution, cfg.outputs, cfg.head) == (512, ("quality", "alignment"), "mlp")
    assert ours.shape == (2, 2)
    _assert_matches_spec(ours, ft, clip, 512)


def test_import_matches_spec_forward_at_224_one_output_linear(authors_224_linear, tmp_path):
    ft_path, clip_path, ft, clip = authors_224_linear
    cfg, ours = _scores_after_import(ft_path, clip_path, tmp_path, 224)
    assert (cfg.resolution, cfg.outputs, cfg.head) == (224, ("quality",), "linear")
    _assert_matches_spec(ours, ft, clip, 224)


def test_fine_tuned_text_tensors_take_precedence_over_base(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    _, sd = convert_official(ft, clip)
    assert torch.equal(sd["text.token_embedding.weight"], ft["wte.weight"])
    assert torch.equal(sd["text.positional_embedding"], ft["txt_pos"])
    assert torch.equal(sd["text.transformer.resblocks.3.mlp.c_fc.weight"], clip["transformer.resblocks.3.mlp.c_fc.weight"])
    assert torch.equal(sd["visual.layer1.0.conv1.weight"], ft["resnet50.layer1.0.conv1.weight"])


def test_batchnorm_running_stats_are_imported(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    _, sd = convert_official(ft, clip)
    assert torch.equal(sd["visual.layer3.2.bn2.running_var"], ft["resnet50.layer3.2.bn2.running_var"])


def test_base_weights_as_torchscript_archive_import_like_state_dict(authors_224_linear, tmp_path):
    ft_path, clip_path, _, clip = authors_224_linear
    archive = save_torchscript(clip, tmp_path / "RN50.pt")
    from_archive = read_clip_base(archive)
    assert set(from_archive) == set(clip)
    _, a = import_official(ft_path, archive)
    _, b = import_official(ft_path, clip_path)
    key = "text.transformer.resblocks.0.attn.in_proj_weight"
    assert a[key].dtype == torch.float32  # fp16 archive is widened
    assert torch.allclose(a[key], b[key], atol=1e-3)


def test_bare_state_dict_is_accepted_as_fine_tuned_file(authors_224_linear, tmp_path):
    _, _, ft, _ = authors_224_linear
    torch.save({"module." + k: v for k, v in ft.items()}, tmp_path / "bare.pth")
    assert set(read_official_finetuned(tmp_path / "bare.pth")) == set(ft)


def test_missing_head_tensor_names_key_and_file(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    broken = {k: v for k, v in ft.items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=r"head\.bias.*FT\.pth"):
        convert_official(broken, clip, ft_name="FT.pth", clip_name="RN50.pt")


def test_missing_text_block_names_both_files(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    broken = {k: v for k, v in clip.items() if k != "transformer.resblocks.5.ln_2.bias"}
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.5\.ln_2\.bias.*FT\.pth or RN50\.pt"):
        convert_official(ft, broken, ft_name="FT.pth", clip_name="RN50.pt")


def test_base_without_text_transformer_is_refused(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    visual_only = {k: v for k, v in clip.items() if not k.startswith("transformer.")}
    with pytest.raises(CheckpointError, match="RN50.pt"):
        convert_official(ft, visual_only, ft_name="FT.pth", clip_name="RN50.pt")


def test_wrong_shape_names_tensor_shapes_and_file(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    broken = dict(ft, **{"txt_attnpool.cross_attn.k_proj.weight": torch.zeros(2048, 1024)})
    with pytest.raises(CheckpointError, match=r"FT\.pth.*k_proj\.weight.*\(2048, 1024\).*\(2048, 2048\)"):
        convert_official(broken, clip, ft_name="FT.pth", clip_name="RN50.pt")


def test_unknown_tensors_are_refused_rather_than_dropped(authors_224_linear):
    _, _, ft, clip = authors_224_linear
    with pytest.raises(CheckpointError, match="local_branch.proj.weight"):
        convert_official(dict(ft, **{"local_branch.proj.weight": torch.zeros(3)}), clip)


def test_pth_that_is_not_a_dict_is_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth.*dict of tensors"):
        read_official_finetuned(tmp_path / "list.pth")


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(CheckpointError, match="notes.pth.*not a PyTorch checkpoint"):
        read_official_finetuned(tmp_path / "notes.pth")


def test_pickled_python_objects_are_never_unpickled(tmp_path):
    import argparse  # a Namespace of training args is the most common non-tensor object in real .pth files

    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_official_finetuned(tmp_path / "evil.pth")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth.*not found"):
        read_official_finetuned(tmp_path / "nowhere.pth")


def test_saved_model_round_trips_config_and_weights(authors_224_linear, tmp_path):
    ft_path, clip_path, _, _ = authors_224_linear
    cfg, sd = import_official(ft_path, clip_path, outputs=["mos"])
    model = load_model(save_model(tmp_path / "m.safetensors", sd, cfg))
    assert model.cfg == cfg and model.cfg.outputs == ("mos",)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_model_file_with_tampered_weights_is_refused(authors_224_linear, tmp_path):
    ft_path, clip_path, _, _ = authors_224_linear
    cfg, sd = import_official(ft_path, clip_path)
    sd.pop("head.bias")
    with pytest.raises(CheckpointError, match="head.bias"):
        load_model(save_model(tmp_path / "m.safetensors", sd, cfg))


def test_authors_pth_passed_as_model_file_gets_import_hint(authors_224_linear):
    ft_path, _, _, _ = authors_224_linear
    with pytest.raises(CheckpointError, match="import-official"):
        load_model(ft_path)


