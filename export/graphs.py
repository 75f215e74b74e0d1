"""The three exported graphs, as thin wrappers with fixed input/output names.

Split: ``image_encoder`` (trunk + visual attention pool), ``text_encoder`` (the [QA] embedding) and
``fusion`` (cross-modality pool + head). The visual pool sits in the image encoder because it needs
nothing but the feature map: fusion then touches only what depends on the prompt, and every tensor
between the three graphs is an engine output bound straight into the next engine's input on the
device, so the GPU path needs no host round trip. Text embeddings are cached per prompt by the runtime.

The fusion graph has a second output, ``pooled`` (the cross-modality pool), read only by the parity gate:
through a random head a wrong cross pool barely moves the scores (a rolled position table changed the
tiny model's by 1.1e-5), so the gate checks the pool itself. The runtime asks ONNX Runtime for ``scores``
only and TensorRT engines are built without it (``GraphSpec.runtime_outputs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ipiqa.model import IPIQA

__all__ = ["GraphSpec", "graph_specs", "ImageEncoderGraph", "TextEncoderGraph", "FusionGraph", "ImageOnlyFusionGraph",
           "build_graphs", "MASK_VALUE", "GATE_OUTPUTS", "GRAPH_FORMAT"]

# Finite additive causal mask: -inf in FP16 engines turns fully masked rows into NaN and is a known
# TensorRT trap; -1e4 still underflows exp() to exactly 0 in FP32, so FP32 results are unchanged.
MASK_VALUE = -1e4
GATE_OUTPUTS = ("pooled",)  # graph outputs only the parity gate reads
# What the traced graphs are, beyond weights and options; in the FP32 stage's reuse key, so a re-export into an
# old bundle re-traces. 2: the text graph's sequence axis is dynamic.
GRAPH_FORMAT = 2


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # every graph output, gate-only ones included
    sequence_inputs: tuple[str, ...] = ()  # inputs whose axis 1 is dynamic too (up to the context length)

    @property
    def runtime_outputs(self) -> tuple[str, ...]:
        """What scoring reads (and what an engine is built to produce): ``outputs`` less ``GATE_OUTPUTS``."""
        return tuple(o for o in self.outputs if o not in GATE_OUTPUTS)


def graph_specs(model: IPIQA) -> dict[str, GraphSpec]:
    fusion_in = ("feature_map", "image_embedding", "text_embedding") if model.cfg.text else ("image_embedding",)
    return {
        "image_encoder": GraphSpec("image_encoder", ("image",), ("feature_map", "image_embedding")),
        "text_encoder": GraphSpec("text_encoder", ("tokens",), ("text_embedding",), sequence_inputs=("tokens",)),
        "fusion": GraphSpec("fusion", fusion_in, ("scores", "pooled") if model.cfg.text else ("scores",)),
    }


class ImageEncoderGraph(nn.Module):
    """uint8 (B, R, R, 3) as the host decodes and resizes it; cast, /255 and mean/std run inside the graph."""

    def __init__(self, model: IPIQA):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_pixels(image)


class TextEncoderGraph(nn.Module):
    """open_clip's TextTransformer forward, with the end-of-text lookup made engine-safe.

    TensorRT refuses ArgMax on INT64 (and INT32 in some versions): the ids are cast to float32 first,
    exact for ids < 2^24 (CLIP's vocabulary has 49,408), and the row is read with ``gather``.

    The sequence axis is dynamic (2 to ``context_length`` tokens; the positional table and the causal mask are
    sliced to it, as open_clip's own forward does): under the causal mask the end-of-text row reads only the
    tokens up to it, so the runtime may cut each call at its end-of-text (``runtime.backends.base.short_tokens``).
    The tokenizer pads with zeros after end-of-text and the dataset prompts' mean length is 34 of 77 tokens, so
    the text graph does ~2.3x less work for the same embedding (issue 30: the text graph at 1 image per prompt).
    """

    def __init__(self, model: IPIQA):
        super().__init__()
        self.text = model.text
        n = model.cfg.context_length
        self.register_buffer("mask", torch.full((n, n), MASK_VALUE).triu(1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t, n = self.text, tokens.shape[1]
        x = t.token_embedding(tokens) + t.positional_embedding[:n]
        x = t.ln_final(t.transformer(x, attn_mask=self.mask[:n, :n]))
        eot = tokens.to(torch.float32).argmax(dim=-1)
        x = torch.gather(x, 1, eot[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        return x @ t.text_projection


class FusionGraph(nn.Module):
    """``IPIQA.fuse`` written out so the cross pool's output is a graph output too (``pooled``, gate only)."""

    def __init__(self, model: IPIQA):
        super().__init__()
        self.model = model

    def forward(self, feature_map: torch.Tensor, image_embedding: torch.Tensor,
                text_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        pooled = m.txt_attnpool(feature_map, text_embedding, m.single_query_pooling)
        return m.head(torch.cat([image_embedding, pooled.to(image_embedding.dtype)], dim=-1)), pooled


class ImageOnlyFusionGraph(nn.Module):
    """Fusion of a model without the text branch (config text=False): the head on the visual embedding."""

    def __init__(self, model: IPIQA):
        super().__init__()
        self.model = model

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return self.model.fuse(image_embedding[:, :0, None, None], image_embedding)


def build_graphs(model: IPIQA) -> dict[str, nn.Module]:
    graphs: dict[str, nn.Module] = {"image_encoder": ImageEncoderGraph(model)}
    if model.cfg.text:
        graphs.update(text_encoder=TextEncoderGraph(model), fusion=FusionGraph(model))
    else:
        graphs["fusion"] = ImageOnlyFusionGraph(model)
    return {k: g.eval() for k, g in graphs.items()}
