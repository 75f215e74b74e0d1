"""The authors' checkpoint layout, built from the spec alone: seeded random tensors with the exact key
names and shapes of shared/reference/official-ipiqa-checkpoint-keys.tsv, and an independent functional
forward written from the spec's step list. Nothing here imports ipiqa's model code."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official-ipiqa-checkpoint-keys.tsv"


def tsv_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_TSV.read_text().splitlines():
        if "\t" not in line:
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def _fill(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1234, dtype=torch.int64)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) * 1.5 + 0.5
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=g) * 0.1
    if re.search(r"(bn\d|downsample\.1|ln_\d|ln_final)\.weight$", key):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if key.endswith("positional_embedding") or key in ("txt_pos", "positional_embedding"):
        return 0.02 * torch.randn(shape, generator=g)
    if key.endswith(("wte.weight", "token_embedding.weight")):
        return 0.02 * torch.randn(shape, generator=g)
    if key == "logit_scale":
        return torch.tensor(4.6052)
    fan_in = shape[0] if key.endswith("text_projection") else math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def authors_files(resolution: int = 512, n_out: int = 2, head: str = "mlp", seed: int = 0):
    """(fine-tuned 'model' state dict, base CLIP state dict) as the authors' trainer and OpenAI ship them."""
    g = torch.Generator().manual_seed(seed)
    rows = (resolution // 32) ** 2 + 1
    shapes = {}
    for key, shape in tsv_shapes().items():
        if key.startswith("head."):
            continue
        if key.endswith("positional_embedding") and key != "txt_pos":
            shape = (rows, shape[1])
        shapes[key] = shape
    if head == "mlp":
        shapes.update({"head.dense.weight": (2048, 2048), "head.dense.bias": (2048,),
                       "head.out_proj.weight": (n_out, 2048), "head.out_proj.bias": (n_out,)})
    else:
        shapes.update({"head.weight": (n_out, 2048), "head.bias": (n_out,)})
    ft = {k: _fill(k, s, g) for k, s in shapes.items()}

    base_shapes = {"token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
                   "text_projection": (512, 1024), "ln_final.weight": (512,), "ln_final.bias": (512,),
                   "logit_scale": ()}
    for i in range(12):
        p = f"transformer.resblocks.{i}."
        base_shapes.update({p + "ln_1.weight": (512,), p + "ln_1.bias": (512,),
                            p + "attn.in_proj_weight": (1536, 512), p + "attn.in_proj_bias": (1536,),
                            p + "attn.out_proj.weight": (512, 512), p + "attn.out_proj.bias": (512,),
                            p + "ln_2.weight": (512,), p + "ln_2.bias": (512,),
                            p + "mlp.c_fc.weight": (2048, 512), p + "mlp.c_fc.bias": (2048,),
                            p + "mlp.c_proj.weight": (512, 2048), p + "mlp.c_proj.bias": (512,)})
    for key, shape in shapes.items():  # OpenAI's visual tower at 224 px, with other values than the .pth
        if key.startswith("resnet50."):
            base_shapes["visual." + key[len("resnet50."):]] = shape
        elif key.startswith("attnpool."):
            base_shapes["visual." + key] = (50, 2048) if key.endswith("positional_embedding") else shape
    clip = {k: _fill(k, s, g) for k, s in base_shapes.items()}
    return ft, clip


# ---------------------------------------------------------------- the spec's forward, step by step


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _bottleneck(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
    out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), sd, p + ".bn2"))
    if stride > 1:
        out = F.avg_pool2d(out, stride)
    out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
    if p + ".downsample.0.weight" in sd:
        idt = F.avg_pool2d(x, stride) if stride > 1 else x
        x = _bn(F.conv2d(idt, sd[p + ".downsample.0.weight"]), sd, p + ".downsample.1")
    return F.relu(out + x)


def _attention(q, k, v, heads, mask=None):
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)


def _tokens(fmap, pos):
    x = fmap.flatten(2).transpose(1, 2)
    return torch.cat([x.mean(1, keepdim=True), x], 1) + pos


def reference_forward(ft, clip, images, tokens):
    """Spec steps 1-4 on the raw authors' tensors (ft first, frozen text tower from the base file)."""
    # 1. text
    x = ft["wte.weight"][tokens] + ft["txt_pos"]
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(12):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (512,), clip[p + "ln_1.weight"], clip[p + "ln_1.bias"])
        qkv = F.linear(h, clip[p + "attn.in_proj_weight"], clip[p + "attn.in_proj_bias"])
        a = _attention(*qkv.chunk(3, dim=-1), heads=8, mask=mask)
        x = x + F.linear(a, clip[p + "attn.out_proj.weight"], clip[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (512,), clip[p + "ln_2.weight"], clip[p + "ln_2.bias"])
        h = F.linear(h, clip[p + "mlp.c_fc.weight"], clip[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, clip[p + "mlp.c_proj.weight"], clip[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (512,), clip["ln_final.weight"], clip["ln_final.bias"])
    text = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ ft["text_projection"]
    # 2. image trunk
    r = {k[len("resnet50."):]: v for k, v in ft.items() if k.startswith("resnet50.")}
    y = images
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        y = F.relu(_bn(F.conv2d(y, r[f"conv{i}.weight"], stride=stride, padding=1), r, f"bn{i}"))
    y = F.avg_pool2d(y, 2)
    for layer, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        nblocks = len({k.split(".")[1] for k in r if k.startswith(f"layer{layer}.")})
        for j in range(nblocks):
            y = _bottleneck(y, r, f"layer{layer}.{j}", stride if j == 0 else 1)
    # 3. pools
    t = _tokens(y, ft["attnpool.positional_embedding"])
    lin = lambda z, p: F.linear(z, ft[p + ".weight"], ft[p + ".bias"])  # noqa: E731
    visual = lin(_attention(lin(t[:, :1], "attnpool.q_proj"), lin(t, "attnpool.k_proj"),
                            lin(t, "attnpool.v_proj"), heads=32), "attnpool.c_proj")[:, 0]
    t = _tokens(y, ft["txt_attnpool.positional_embedding"])
    c = "txt_attnpool.cross_attn."
    prompt = lin(_attention(lin(text[:, None], c + "q_proj"), lin(t, c + "k_proj"), lin(t, c + "v_proj"),
                            heads=32), c + "out_proj")[:, 0]
    # 4. head
    z = torch.cat([visual, prompt], -1)
    if "head.dense.weight" in ft:
        return lin(torch.tanh(lin(z, "head.dense")), "head.out_proj")
    return lin(z, "head")
