"""The project's model file: one safetensors file, weights + ``IPIQAConfig`` JSON in its metadata.

safetensors holds only tensors (no pickle), so a model file from anywhere is safe to open. ``read_config``
needs no torch (``ipiqa info MODEL`` works on a base install); the weights functions import it when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Union

from safetensors import SafetensorError, safe_open

from ._optional import require
from .config import IPIQAConfig
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from .model import IPIQA

__all__ = ["FORMAT", "save_model", "read_config", "load_model", "load_state_dict"]

FORMAT = "ipiqa/1"
PathLike = Union[str, Path]


def save_model(path: PathLike, state_dict: Mapping[str, torch.Tensor], cfg: IPIQAConfig) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": cfg.to_json()})
    return path


def _refuse_non_regular(path: Path) -> None:
    """A FIFO, socket or device is refused before anything opens it (opening a FIFO blocks until a writer comes).

    The wording is ``ipiqa.preprocess``'s; a folder or a missing path is left to the open, which reports it.
    """
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        from .preprocess import _not_regular  # the one wording of "not a regular file"

        raise CheckpointError(f"{path}: {_not_regular(mode)}; a model file is a .safetensors file")


def read_config(path: PathLike) -> IPIQAConfig:
    """Config of a model file without reading its weights."""
    path = Path(path)
    _refuse_non_regular(path)
    try:
        with safe_open(str(path), framework="numpy") as f:  # metadata only: no torch needed
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a safetensors model file ({exc}). Authors' .pth checkpoints are imported with "
            "'ipiqa import-official FT.pth --clip RN50.pt -o model.safetensors'"
        ) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path}: safetensors file without ipiqa metadata (format={meta.get('format')!r}); "
            "write models with ipiqa (import-official, train) so the config travels with them"
        )
    try:
        return IPIQAConfig.from_json(meta["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid config in metadata: {exc}") from None


def load_state_dict(path: PathLike) -> tuple[IPIQAConfig, dict[str, torch.Tensor]]:
    cfg = read_config(path)  # refuses a FIFO or device first
    require("torch", extra="torch")
    from safetensors.torch import load_file

    return cfg, load_file(str(path), device="cpu")


def load_model(path: PathLike, device: Union[str, "torch.device"] = "cpu") -> "IPIQA":
    """Model in eval mode; every tensor must match the config's architecture exactly."""
    cfg, sd = load_state_dict(path)
    require("open_clip", extra="torch")
    from .model import IPIQA

    model = IPIQA(cfg)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise CheckpointError(f"{path}: weights do not match its config: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; the file is damaged or was edited"
        )
    return model.to(device).eval()


