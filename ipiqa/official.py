"""Import of the authors' training checkpoints (see shared/reference/official-ipiqa-checkpoint.md).

Their ``.pth`` holds only what was trainable; the frozen text transformer and ``ln_final`` come from
the base CLIP RN50 weights. ``convert_official`` is a pure dict -> dict function; the file readers
around it only decide how to open files safely.
"""
from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .config import DEFAULT_OUTPUTS, IPIQAConfig
from .errors import CheckpointError
from .model import IPIQA

__all__ = [
    "convert_official",
    "infer_config",
    "interpolate_pos_embed",
    "read_official_finetuned",
    "read_clip_base",
    "import_official",
    "init_from_clip",
]

StateDict = dict[str, torch.Tensor]

# Our key prefix -> (authors' .pth prefix, base CLIP prefix or None). First match wins.
_SOURCES: tuple[tuple[str, str, Optional[str]], ...] = (
    ("visual.attnpool.", "attnpool.", "visual.attnpool."),
    ("visual.", "resnet50.", "visual."),
    ("text.token_embedding.", "wte.", "token_embedding."),
    ("text.positional_embedding", "txt_pos", "positional_embedding"),
    ("text.text_projection", "text_projection", "text_projection"),
    ("text.transformer.", "txt_model.", "transformer."),
    ("text.ln_final.", "ln_final.", "ln_final."),
    ("txt_attnpool.", "txt_attnpool.", None),
    ("head.", "head.", None),
)
_KNOWN_FT_PREFIXES = tuple(src for _, src, _ in _SOURCES)


def interpolate_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g0^2, C) -> (1 + grid^2, C): bicubic on the spatial rows, mean-token row kept (authors' code)."""
    g0 = math.isqrt(table.shape[0] - 1)
    if g0 == grid:
        return table
    spatial = table[1:].reshape(g0, g0, -1).permute(2, 0, 1).unsqueeze(0).float()
    spatial = F.interpolate(spatial, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1].float(), spatial.squeeze(0).permute(1, 2, 0).flatten(0, 1)], dim=0)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _need(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{where}: missing tensor '{key}'; is this an IP-IQA checkpoint of the authors' code?")
    return sd[key]


def infer_config(
    ft: Mapping[str, torch.Tensor],
    clip: Mapping[str, torch.Tensor],
    outputs: Optional[Sequence[str]] = None,
    ft_name: str = "fine-tuned checkpoint",
    clip_name: str = "base CLIP weights",
) -> IPIQAConfig:
    """Read the model's shape off its tensors: the table size gives the resolution, the head gives N."""
    pos = _need(ft, "attnpool.positional_embedding", ft_name)
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise CheckpointError(f"{ft_name}: 'attnpool.positional_embedding' has {pos.shape[0]} rows, not 1 + a square")
    if "head.dense.weight" in ft:
        head, n_out = "mlp", _need(ft, "head.out_proj.weight", ft_name).shape[0]
    elif "head.weight" in ft:
        head, n_out = "linear", ft["head.weight"].shape[0]
    else:
        raise CheckpointError(f"{ft_name}: no head found (neither 'head.dense.weight' nor 'head.weight')")
    if n_out not in DEFAULT_OUTPUTS:
        raise CheckpointError(f"{ft_name}: head has {n_out} outputs; IP-IQA models have 1 or 2")
    text = any(k.startswith("txt_attnpool.") for k in ft)
    txt_pos = ft.get("txt_pos", clip.get("positional_embedding"))
    wte = ft.get("wte.weight", clip.get("token_embedding.weight"))
    if text and (txt_pos is None or wte is None):
        raise CheckpointError(
            f"missing tensor 'txt_pos'/'wte.weight' in {ft_name} and 'positional_embedding'/"
            f"'token_embedding.weight' in {clip_name}: pass the base CLIP RN50 weights the model was trained from"
        )
    vision_width = _need(ft, "resnet50.conv1.weight", ft_name).shape[0] * 2
    text_width = txt_pos.shape[1] if text else 512
    text_layers = _count(clip, r"transformer\.resblocks\.(\d+)\.") or _count(ft, r"txt_model\.resblocks\.(\d+)\.")
    if text and not text_layers:
        raise CheckpointError(
            f"missing text transformer: no 'transformer.resblocks.*' in {clip_name}; "
            "pass OpenAI's RN50.pt (or a state_dict of it) with --clip"
        )
    return IPIQAConfig(
        resolution=grid * 32,
        outputs=tuple(outputs) if outputs else DEFAULT_OUTPUTS[n_out],
        head=head,
        text=text,
        context_length=txt_pos.shape[0] if text else 77,
        vision_layers=tuple(_count(ft, rf"resnet50\.layer{i}\.(\d+)\.") for i in range(1, 5)),
        vision_width=vision_width,
        embed_dim=_need(ft, "attnpool.c_proj.weight", ft_name).shape[0],
        vision_heads=vision_width * 32 // 64,
        text_width=text_width,
        text_layers=text_layers or 12,
        text_heads=text_width // 64,
        vocab_size=wte.shape[0] if text else 49408,
    )


def _source_for(key: str, ft: Mapping, clip: Mapping) -> tuple[Optional[str], Optional[str]]:
    for ours, ft_prefix, clip_prefix in _SOURCES:
        if key.startswith(ours):
            rest = key[len(ours):]
            if ft_prefix + rest in ft:
                return "ft", ft_prefix + rest
            if clip_prefix is not None and clip_prefix + rest in clip:
                return "clip", clip_prefix + rest
            return None, ft_prefix + rest if clip_prefix is None else clip_prefix + rest
    return None, None


def convert_official(
    ft: Mapping[str, torch.Tensor],
    clip: Mapping[str, torch.Tensor],
    outputs: Optional[Sequence[str]] = None,
    ft_name: str = "fine-tuned checkpoint",
    clip_name: str = "base CLIP weights",
) -> tuple[IPIQAConfig, StateDict]:
    """Authors' trainable-only state dict + base CLIP state dict -> (config, our state dict, FP32)."""
    unknown = sorted(k for k in ft if not k.startswith(_KNOWN_FT_PREFIXES))
    if unknown:
        raise CheckpointError(
            f"{ft_name}: tensors of no known IP-IQA part {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
            "a modified model cannot be imported without losing those weights"
        )
    cfg = infer_config(ft, clip, outputs, ft_name, clip_name)
    with torch.device("meta"):
        expected = IPIQA(cfg).state_dict()
    out: StateDict = {}
    for key, ref in expected.items():
        origin, name = _source_for(key, ft, clip)
        if origin is None:
            files = ft_name if key.startswith(("txt_attnpool.", "head.")) else f"{ft_name} or {clip_name}"
            raise CheckpointError(f"missing tensor '{name}' (for {key}): it is in neither {files}")
        tensor = (ft if origin == "ft" else clip)[name]
        if key == "visual.attnpool.positional_embedding" and tensor.shape != ref.shape:
            tensor = interpolate_pos_embed(tensor, cfg.grid)
        if tuple(tensor.shape) != tuple(ref.shape):
            file = ft_name if origin == "ft" else clip_name
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} for a "
                f"{cfg.resolution}px RN50 IP-IQA model; the two files must come from the same model family"
            )
        out[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.clone()
    return cfg, out


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _torch_load(path: Path, what: str) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds Python objects beyond tensors ({str(exc).splitlines()[0]}). "
            "If you trust it, re-save only its weights: torch.save(torch.load(p)['model'], 'weights.pth')"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything (IndexError, KeyError, ...) on junk
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({str(exc).splitlines()[0]})") from None


def _tensor_dict(obj: object, path: Path, what: str) -> StateDict:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors for the {what}, got {type(obj).__name__}")
    return _strip_prefix(obj)


def read_official_finetuned(path: Union[str, Path]) -> StateDict:
    """The ``model`` entry of the authors' ``torch.save({'model': ..., ...})`` (a bare state dict is accepted)."""
    path = Path(path)
    obj = _torch_load(path, "fine-tuned checkpoint")
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    return _tensor_dict(obj, path, "fine-tuned model ('model' entry)")


def read_clip_base(path: Union[str, Path]) -> StateDict:
    """OpenAI's ``RN50.pt`` (a TorchScript archive) or a plain state dict of it."""
    path = Path(path)
    if path.is_file() and _is_torchscript(path):
        # TorchScript archives hold TorchScript code, not arbitrary pickled Python; loading them is how
        # OpenAI distributes RN50.pt (open_clip does the same). We keep only the tensors.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation: still how RN50.pt ships
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({str(exc).splitlines()[0]})") from None
    obj = _torch_load(path, "base CLIP weights")
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return _tensor_dict(obj, path, "base CLIP weights")


def import_official(
    ft_path: Union[str, Path], clip_path: Union[str, Path], outputs: Optional[Sequence[str]] = None
) -> tuple[IPIQAConfig, StateDict]:
    ft_path, clip_path = Path(ft_path), Path(clip_path)
    return convert_official(
        read_official_finetuned(ft_path), read_clip_base(clip_path), outputs, str(ft_path), str(clip_path)
    )


def init_from_clip(model: IPIQA, clip: Mapping[str, torch.Tensor]) -> list[str]:
    """Load base CLIP RN50 weights into a fresh model (the start of training); returns the keys left at init.

    The attention-pool table is bicubically interpolated to the model's grid, as the authors did; the
    cross-modality pool and the head have no CLIP counterpart and keep their initialization.
    """
    own = model.state_dict()
    loaded = {}
    for key, ref in own.items():
        origin, name = _source_for(key, {}, clip)
        if origin != "clip":
            continue
        tensor = clip[name].float() if clip[name].is_floating_point() else clip[name]
        if key == "visual.attnpool.positional_embedding":
            tensor = interpolate_pos_embed(tensor, model.cfg.grid)
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"base CLIP tensor '{name}' has shape {tuple(tensor.shape)}, model needs {tuple(ref.shape)}")
        loaded[key] = tensor
    model.load_state_dict(loaded, strict=False)
    return sorted(set(own) - set(loaded))
