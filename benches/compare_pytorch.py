#!/usr/bin/env python3
"""Side-by-side timing of tuwen against PyTorch (HF transformers / timm) on the same shapes.

Runs, in one invocation and alternating between the two, each workload at the given batch
sizes: PyTorch on CPU with the same thread count, fp32, `torch.inference_mode()` (autograd
for the training steps), random weights; and the Rust timing binary `benches/compare.rs` (built with `cargo bench --bench
compare --no-run`; the workloads are in `benches/workloads.rs`). Every measurement runs in
its own process, so that its peak resident set size (`VmHWM`) is that workload's alone.
Writes a ratio table (ours / PyTorch, lower is better) to benches/RESULTS.md with the
machine, versions and date.

    python3 benches/compare_pytorch.py --threads 2 --batches 1 8 --iters 3

`--baseline-binary PATH` also times a second build of `compare` (say, from the commit before
a change) right after tuwen's on every row, and adds its ratio and tuwen / baseline.

The PyTorch side of each workload:

* `siglip2-*`: transformers `SiglipModel` / `Siglip2Model` (B/16, text length 64);
* `r2d2-vitl14-image`: transformers `CLIPVisionModel` (ViT-L/14, 224 px, quick_gelu) and
  R2D2's `vision_proj` with L2 normalisation;
* `r2d2-bert-text`: transformers `BertModel` (chinese-roberta-wwm-ext shape, 64 tokens, with
  the padding mask) and `text_proj`;
* `r2d2-itm-rerank`: R2D2's two 6-layer cross encoders (BLIP `xbert` layers written with
  `nn.Linear`, `nn.LayerNorm` and `F.scaled_dot_product_attention`) and ITM heads, one image
  (257 tokens) against 128 candidate texts of 64 tokens per query;
* `brivl-image`: timm `tf_efficientnet_b5` `forward_features` at 380 px, then BriVL's RoI
  grid sampling (`F.affine_grid` + `F.grid_sample`, 4x4 samples, 37 boxes), the 1x1 conv
  applied after averaging the samples (as tuwen does; the original applies it before, which
  gives the same numbers at 16 times the cost), 4 `nn.TransformerEncoderLayer`s and `imgFC`
  (as in tests/fixtures/gen_brivl.py);
* `cnclip-b16-image` / `cnclip-b16-text`: transformers `ChineseCLIPModel` (ViT-B/16 at
  224 px; RoBERTa-wwm-ext base on 52 tokens with the padding mask), `get_image_features` /
  `get_text_features` and L2 normalisation;
* `brivl-text`: transformers `BertModel` on 80 tokens without a mask, 4
  `nn.TransformerEncoderLayer`s with the padding mask, `textFC`.

Training steps (forward, backward, `torch.optim.AdamW` lr 1e-3 / weight decay 0.01 against
tuwen's AdamW with the same defaults; small configs, 224 px, 32 tokens, fp32):

* `siglip-train-small`: transformers `SiglipModel(return_loss=True)`, both towers 256 wide,
  4 layers, 4 heads, MLP 1024, patch 16, 32000-token vocabulary;
* `r2d2-train-small`: R2D2's GCPR + FGR (fixed hard negatives: pair i+1; class weights
  [1, 2]) as `tests/fixtures/gen_r2d2_train.py` states them, on transformers
  `CLIPVisionModel` (256 wide, 4 layers, patch 14) and `BertModel` (256 wide, 4 layers, no
  dropout) with 2 + 2 cross-encoder layers;
* `brivl-train-small`: one BriVL MoCo step as `tests/fixtures/gen_brivl_moco.py` states it
  (the released `VL_model.forward` training branch): momentum update of every key-encoder
  parameter (m 0.99), queries with gradient and keys without, i2t / t2i logits against two
  queues of 4096 keys / T (0.07), backward, AdamW, enqueue of the keys after the step. The
  towers are those of `brivl-image` / `brivl-text` made small: timm `tf_efficientnet_b0`
  (1280 features, the embedding width) at 224 px with 37 boxes (6x6 grid + whole image) and
  the 4x4 RoI grid; `BertModel` 256 wide, 4 layers, 4 heads, MLP 1024; BriVL's heads
  unchanged (4 + 4 post-LN layers, 4 heads, feed-forward 2048). As tuwen's `BrivlMoco`
  trains: eval mode (BN on running statistics, no dropout), its `default_trainable` set
  (EfficientNet blocks 3-6, the four BERT layers, every head: 66.1M of 72.1M parameters) and
  its default AdamW groups (no weight decay on tensors of rank < 2). The key encoders are
  full copies (tuwen shares the frozen tensors between the two and moves only the trained
  ones: the same numbers).
"""
import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time

RERANK_CANDIDATES = 128
TEXT_LEN = 64


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def siglip_text_cfg():
    return dict(vocab_size=256000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=64)


def bert_cfg(**kw):
    from transformers import BertConfig

    args = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=512, layer_norm_eps=1e-12)
    return BertConfig(**{**args, **kw})


def torch_workload(name, batch):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if name in ("siglip2-b16-image", "siglip2-b16-text"):
        from transformers import SiglipConfig, SiglipModel

        cfg = SiglipConfig(
            text_config=siglip_text_cfg(),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16),
        )
        m = SiglipModel(cfg).eval()
        if name.endswith("image"):
            px = torch.randn(batch, 3, 224, 224)
            return lambda: m.get_image_features(pixel_values=px)
        ids = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        return lambda: m.get_text_features(input_ids=ids)
    if name == "siglip2-b16-naflex-image":
        from transformers import Siglip2Config, Siglip2Model

        cfg = Siglip2Config(
            text_config=siglip_text_cfg(),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, patch_size=16, num_patches=256),
        )
        m = Siglip2Model(cfg).eval()
        px = torch.randn(batch, 256, 768)
        mask = torch.ones(batch, 256, dtype=torch.long)
        shapes = torch.tensor([[16, 16]] * batch)
        return lambda: m.get_image_features(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes)
    if name == "r2d2-vitl14-image":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
        vit = CLIPVisionModel(cfg).eval()
        proj = nn.Linear(1024, 768)
        px = torch.randn(batch, 3, 224, 224)
        return lambda: F.normalize(proj(vit(pixel_values=px).last_hidden_state[:, 0]), dim=-1)
    if name == "r2d2-bert-text":
        from transformers import BertModel

        bert = BertModel(bert_cfg(), add_pooling_layer=False).eval()
        proj = nn.Linear(768, 768)
        ids = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        return lambda: F.normalize(proj(bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
    if name in ("cnclip-b16-image", "cnclip-b16-text"):
        from transformers import ChineseCLIPConfig, ChineseCLIPModel

        cfg = ChineseCLIPConfig(
            text_config=dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16,
                               projection_dim=512),
            projection_dim=512,
        )
        m = ChineseCLIPModel(cfg).eval()
        if name.endswith("image"):
            px = torch.randn(batch, 3, 224, 224)
            return lambda: F.normalize(m.get_image_features(pixel_values=px).pooler_output, dim=-1)
        ids = torch.ones(batch, 52, dtype=torch.long)
        mask = torch.ones(batch, 52, dtype=torch.long)
        return lambda: F.normalize(
            m.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    if name == "r2d2-itm-rerank":
        return itm_workload(batch)
    if name == "brivl-image":
        return brivl_image_workload(batch)
    if name == "brivl-text":
        return brivl_text_workload(batch)
    if name == "siglip-train-small":
        return siglip_train_workload(batch)
    if name == "r2d2-train-small":
        return r2d2_train_workload(batch)
    if name == "brivl-train-small":
        return brivl_train_workload(batch)
    raise ValueError(name)


def itm_layers(d, kv, n, heads=12, inter=3072):
    """R2D2's cross-encoder layers (BLIP `xbert` with cross-attention), `n` of them."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self, d, kv, heads):
            super().__init__()
            self.h = heads
            self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv, d), nn.Linear(kv, d)
            self.dense, self.norm = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)

        def forward(self, x, ctx, bias):
            b, lq, d = x.shape
            lk = ctx.shape[1]
            q = self.query(x).view(b, lq, self.h, -1).transpose(1, 2)
            k = self.key(ctx).view(b, lk, self.h, -1).transpose(1, 2)
            v = self.value(ctx).view(b, lk, self.h, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, lq, d)
            return self.norm(self.dense(a) + x)

    class Layer(nn.Module):
        def __init__(self, d, kv):
            super().__init__()
            self.attention, self.cross = Attn(d, d, heads), Attn(d, kv, heads)
            self.intermediate, self.output = nn.Linear(d, inter), nn.Linear(inter, d)
            self.norm = nn.LayerNorm(d, eps=1e-12)

        def forward(self, x, self_bias, ctx, ctx_bias):
            x = self.attention(x, x, self_bias)
            x = self.cross(x, ctx, ctx_bias)
            return self.norm(self.output(F.gelu(self.intermediate(x))) + x)

    return nn.ModuleList([Layer(d, kv) for _ in range(n)])


def bias(mask, neg):
    return ((1.0 - mask.float()) * neg)[:, None, None, :]


def itm_workload(batch):
    import torch
    import torch.nn as nn

    tj = itm_layers(768, 1024, 6).eval()
    ij = itm_layers(768, 768, 6).eval()
    ij_proj, head, head_i = nn.Linear(1024, 768), nn.Linear(768, 2), nn.Linear(768, 2)
    n = batch * RERANK_CANDIDATES
    img = torch.randn(batch, 1, 257, 1024)
    txt = torch.randn(n, TEXT_LEN, 768)
    mask = torch.ones(n, TEXT_LEN, dtype=torch.long)

    def run():
        im = img.expand(batch, RERANK_CANDIDATES, 257, 1024).reshape(n, 257, 1024)
        t = txt
        for layer in tj:
            t = layer(t, bias(mask, -10000.0), im, None)
        q = ij_proj(im)
        for layer in ij:
            q = layer(q, None, txt, bias(mask, -1e9))
        pt = head(t[:, 0]).softmax(-1)[:, 1]
        pi = head_i(q[:, 0]).softmax(-1)[:, 1]
        return (pt + pi) / 2

    return run


def brivl_heads(d, ff_in, heads, layers):
    import torch.nn as nn
    import torch.nn.functional as F

    class Fc(nn.Module):
        def __init__(self, i, h, o):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(i, h), nn.Linear(h, o)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    layer = nn.TransformerEncoderLayer(d_model=d, nhead=heads)
    att = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    return att, Fc(d, ff_in, ff_in).eval()


def masked_mean(x, mask):
    m = mask.float().unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1)


def brivl_grid_boxes(batch, size, g):
    """BriVL's boxes for images without detector boxes: a `g` x `g` grid plus the whole image."""
    import torch

    c = size / g
    rows = [[k * c, i * c, (k + 1) * c, (i + 1) * c] for i in range(g) for k in range(g)] + [[0, 0, size, size]]
    return torch.tensor([rows] * batch, dtype=torch.float32)


def brivl_roi(feat, rois, size, grid, conv):
    """BriVL's RoI grid sampling: per box an affine grid (theta in the align_corners=True
    convention, sampled with align_corners=False) of `grid` x `grid` bilinear samples, their
    average, then the 1x1 conv (the original applies the conv first: the same numbers and
    gradients at `grid`^2 times the cost)."""
    import torch
    import torch.nn.functional as F

    b, ch, h, w = feat.shape
    ratio = size / h
    out = []
    for i in range(b):
        x1, y1, x2, y2 = (rois[i, :, j] / ratio for j in range(4))
        zero = torch.zeros_like(x1)
        theta = torch.stack(((x2 - x1) / (w - 1), zero, (x1 + x2 - w + 1) / (w - 1), zero,
                             (y2 - y1) / (h - 1), (y1 + y2 - h + 1) / (h - 1)), dim=1).view(-1, 2, 3)
        gr = F.affine_grid(theta, (rois.shape[1], ch, grid, grid), align_corners=False)
        s = F.grid_sample(feat[i: i + 1].expand(rois.shape[1], ch, h, w), gr, mode="bilinear",
                          padding_mode="zeros", align_corners=False)
        out.append(conv(s.mean((2, 3), keepdim=True)).flatten(1))
    return torch.stack(out, 0)


def brivl_image_workload(batch):
    import timm
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    size, grid, d, nbox = 380, 4, 2048, 37
    backbone = timm.create_model("tf_efficientnet_b5", pretrained=False).eval()
    conv = nn.Conv2d(d, d, 1)
    att, fc = brivl_heads(d, d, 4, 4)
    boxes = brivl_grid_boxes(batch, size, 6)
    mask = torch.ones(batch, nbox, dtype=torch.long)
    px = torch.randn(batch, 3, size, size)

    def run():
        x = brivl_roi(backbone.forward_features(px), boxes, size, grid, conv)
        x = F.normalize(x, dim=-1)
        x = att(x.transpose(0, 1), src_key_padding_mask=(mask == 0)).transpose(0, 1)
        return F.normalize(fc(masked_mean(x, mask)), dim=-1)

    return run


def brivl_text_workload(batch):
    import torch
    import torch.nn.functional as F
    from transformers import BertModel

    length = 80
    bert = BertModel(bert_cfg(), add_pooling_layer=False).eval()
    att, fc = brivl_heads(768, 2048, 4, 4)
    ids = torch.ones(batch, length, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)

    def run():
        x = F.normalize(bert(ids).last_hidden_state, dim=-1)
        x = att(x.transpose(0, 1), src_key_padding_mask=(mask == 0)).transpose(0, 1)
        return F.normalize(fc(masked_mean(x, mask)), dim=-1)

    return run


TRAIN_TEXT_LEN = 32
TRAIN_IMAGE = 224


def adamw_step(params, loss_fn):
    """One training step: forward, backward, `torch.optim.AdamW` (lr 1e-3, weight decay
    0.01, as tuwen's defaults) over `params` (tensors or parameter groups)."""
    import torch

    params = list(params)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return run


def siglip_train_workload(batch):
    import torch
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(
        text_config=dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=TRAIN_TEXT_LEN),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=TRAIN_IMAGE, patch_size=16),
    )
    m = SiglipModel(cfg).train()
    px = torch.randn(batch, 3, TRAIN_IMAGE, TRAIN_IMAGE)
    ids = torch.arange(batch * TRAIN_TEXT_LEN).view(batch, TRAIN_TEXT_LEN)
    return adamw_step(m.parameters(), lambda: m(input_ids=ids, pixel_values=px, return_loss=True).loss)


def r2d2_train_workload(batch):
    """R2D2's GCPR + FGR (fixed hard negatives, class weights [1, 2]) on small towers, as
    `tests/fixtures/gen_r2d2_train.py` states them, with HF CLIP / BERT modules (no dropout,
    as tuwen trains)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import BertModel, CLIPVisionConfig, CLIPVisionModel

    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=TRAIN_IMAGE, patch_size=14,
                                           hidden_act="quick_gelu")).train()
    bert = BertModel(bert_cfg(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                     add_pooling_layer=False).train()
    vproj, tproj = nn.Linear(256, 128), nn.Linear(256, 128)
    tj, ij = itm_layers(256, 256, 2, heads=4, inter=1024), itm_layers(256, 256, 2, heads=4, inter=1024)
    ij_proj, head, head_i = nn.Linear(256, 256), nn.Linear(256, 2), nn.Linear(256, 2)
    temp = nn.Parameter(torch.tensor(0.07))
    mods = [vit, bert, vproj, tproj, tj, ij, ij_proj, head, head_i]
    params = [p for m in mods for p in m.parameters()] + [temp]
    px = torch.randn(batch, 3, TRAIN_IMAGE, TRAIN_IMAGE)
    ids = torch.arange(100, 100 + batch * TRAIN_TEXT_LEN).view(batch, TRAIN_TEXT_LEN)
    mask = torch.ones(batch, TRAIN_TEXT_LEN, dtype=torch.long)
    neg = torch.tensor([(i + 1) % batch for i in range(batch)])
    labels = torch.tensor([1] * batch + [0] * (2 * batch))
    weight = torch.tensor([1.0, 2.0])
    targets = torch.eye(batch)

    def loss_fn():
        tok = vit(pixel_values=px).last_hidden_state
        img = F.normalize(vproj(tok[:, 0]), dim=-1)
        st = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        txt = F.normalize(tproj(st[:, 0]), dim=-1)
        sim_i2t, sim_t2i = img @ txt.T / temp, txt @ img.T / temp
        gcpr = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
                - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
        images = torch.cat([tok, tok[neg], tok])
        texts = torch.cat([st, st, st[neg]])
        masks = torch.cat([mask, mask, mask[neg]])
        t = texts
        for layer in tj:
            t = layer(t, bias(masks, -10000.0), images, None)
        q = ij_proj(images)
        for layer in ij:
            q = layer(q, None, texts, bias(masks, -1e9))
        fgr = (F.cross_entropy(head(t[:, 0]), labels, weight=weight)
               + F.cross_entropy(head_i(q[:, 0]), labels, weight=weight)) / 2
        return gcpr + fgr

    return adamw_step(params, loss_fn)


BRIVL_QUEUE = 4096


def brivl_train_workload(batch):
    """BriVL's MoCo step as `tests/fixtures/gen_brivl_moco.py` states it (the released
    `VL_model.forward` training branch) on small towers: timm `tf_efficientnet_b0` at 224 px
    (1280 features), 37 boxes (6x6 grid + whole image), 4x4 RoI grid; `BertModel` 256 wide,
    4 layers, 4 heads, MLP 1024, 32 tokens (called without a mask, as the original); BriVL's
    heads (4 + 4 `nn.TransformerEncoderLayer`s, 4 heads, feed-forward 2048, `imgFC`,
    `textFC`); queues of 4096 keys. Eval mode (BN on running statistics, no dropout) and
    tuwen's `default_trainable` (EfficientNet blocks 3-6, the four BERT layers, every head),
    as tuwen trains; AdamW groups as tuwen's defaults (no decay on tensors of rank < 2)."""
    import copy

    import timm
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import BertModel

    size, grid, nbox, k_len, m, temp = TRAIN_IMAGE, 4, 37, BRIVL_QUEUE, 0.99, 0.07

    class ImageTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=0)
            d = self.backbone.num_features
            att, fc = brivl_heads(d, d, 4, 4)
            self.learnable = nn.ModuleDict({"imgFC": fc, "imgAtt": att, "max_pool": nn.Sequential(nn.Conv2d(d, d, 1))})

        def forward(self, px, boxes, mask):
            x = brivl_roi(self.backbone.forward_features(px), boxes, size, grid, self.learnable["max_pool"][0])
            x = F.normalize(x, dim=-1)
            x = self.learnable["imgAtt"](x.transpose(0, 1), src_key_padding_mask=(mask == 0)).transpose(0, 1)
            return F.normalize(self.learnable["imgFC"](masked_mean(x, mask)), dim=-1)

    class TextTower(nn.Module):
        def __init__(self, d_img):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.bert = BertModel(bert_cfg(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                    intermediate_size=1024), add_pooling_layer=False)
            att, fc = brivl_heads(256, d_img, 4, 4)
            self.learnable = nn.ModuleDict({"textFC": fc, "textAtt": att})

        def forward(self, ids, mask):
            x = F.normalize(self.backbone.bert(ids).last_hidden_state, dim=-1)
            x = self.learnable["textAtt"](x.transpose(0, 1), src_key_padding_mask=(mask == 0)).transpose(0, 1)
            return F.normalize(self.learnable["textFC"](masked_mean(x, mask)), dim=-1)

    def trainable(name):
        if name.startswith("img.backbone."):
            return any(name.startswith(f"img.backbone.blocks.{i}.") for i in range(3, 7))
        if name.startswith("txt.backbone."):
            return name.startswith("txt.backbone.bert.encoder.layer.")
        return ".learnable." in name

    img = ImageTower()
    query = nn.ModuleDict({"img": img, "txt": TextTower(img.backbone.num_features)}).eval()
    key = copy.deepcopy(query)
    for p in key.parameters():
        p.requires_grad_(False)
    train = []
    for n, p in query.named_parameters():
        p.requires_grad_(trainable(n))
        if p.requires_grad:
            train.append(p)
    groups = [{"params": [p for p in train if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in train if p.ndim < 2], "weight_decay": 0.0}]
    dim = img.backbone.num_features
    queues = {"img": F.normalize(torch.randn(dim, k_len), dim=0), "txt": F.normalize(torch.randn(dim, k_len), dim=0)}
    ptr = [0]
    px = torch.randn(batch, 3, size, size)
    boxes = brivl_grid_boxes(batch, size, 6)
    box_mask = torch.ones(batch, nbox, dtype=torch.long)
    ids = torch.arange(100, 100 + batch * TRAIN_TEXT_LEN).view(batch, TRAIN_TEXT_LEN)
    mask = torch.ones(batch, TRAIN_TEXT_LEN, dtype=torch.long)
    pending = []

    def loss_fn():
        q_img = query["img"](px, boxes, box_mask)
        q_txt = query["txt"](ids, mask)
        with torch.no_grad():
            # The momentum update of every key parameter, as the original.
            for pk, pq in zip(key.parameters(), query.parameters()):
                pk.data = pk.data * m + pq.data * (1.0 - m)
            k_img = key["img"](px, boxes, box_mask)
            k_txt = key["txt"](ids, mask)
        i2t = torch.cat([(q_img * k_txt).sum(-1, keepdim=True), q_img @ queues["txt"]], 1) / temp
        t2i = torch.cat([(q_txt * k_img).sum(-1, keepdim=True), q_txt @ queues["img"]], 1) / temp
        pending[:] = [k_img, k_txt]
        return -F.log_softmax(i2t, 1)[:, 0].sum() / batch - F.log_softmax(t2i, 1)[:, 0].sum() / batch

    step = adamw_step(groups, loss_fn)

    def run():
        loss = step()
        # Enqueue the keys after the optimiser step.
        with torch.no_grad():
            k_img, k_txt = pending
            queues["img"][:, ptr[0]: ptr[0] + batch] = k_img.T
            queues["txt"][:, ptr[0]: ptr[0] + batch] = k_txt.T
            ptr[0] = (ptr[0] + batch) % k_len
        return loss

    return run


def torch_child(name, batch, iters, warmup, threads):
    import contextlib

    import torch

    torch.set_num_threads(threads)
    fn = torch_workload(name, batch)
    # Training steps need autograd; inference runs in inference mode.
    with contextlib.nullcontext() if "train" in name else torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    print(json.dumps({"workload": name, "batch": batch, "median_s": statistics.median(times),
                      "min_s": min(times),
                      "times": times, "peak_rss_mib": peak_rss_mib()}))


def rust_binary():
    def find():
        return [p for p in glob.glob("target/release/deps/compare-*") if os.access(p, os.X_OK) and not p.endswith(".d")]

    if not find():
        subprocess.run(["cargo", "bench", "--bench", "compare", "--no-run"], check=True)
    return max(find(), key=os.path.getmtime)


def run_json(cmd, env):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# Iterations after one warm-up, and the batches, per workload (the large ones take seconds).
PLAN = {
    "r2d2-vitl14-image": dict(iters=2),
    "r2d2-itm-rerank": dict(iters=1, warmup=0, batches=[1]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workloads", nargs="*")
    ap.add_argument("--rust-binary", help="the compare binary (default: the newest built one)")
    ap.add_argument("--baseline-binary",
                    help="a second compare binary (e.g. built from an earlier commit), timed right after the "
                         "first on every row; the table then also gives tuwen / baseline")
    ap.add_argument("--out", default="benches/RESULTS.md")
    ap.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch_child(args.child[0], int(args.child[1]), args.iters, args.warmup, args.threads)
        return
    binary = args.rust_binary or rust_binary()
    workloads = args.workloads or subprocess.run([binary, "--list"], capture_output=True, text=True,
                                                 check=True).stdout.split()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rows = []
    started = time.time()
    args.load_start = os.getloadavg()
    for name in workloads:
        plan = PLAN.get(name, {})
        iters = min(args.iters, plan.get("iters", args.iters))
        for b in plan.get("batches", args.batches):
            warmup = min(args.warmup, plan.get("warmup", args.warmup))
            common = ["--iters", str(iters), "--warmup", str(warmup)]
            pt = run_json([sys.executable, __file__, "--child", name, str(b), "--threads", str(args.threads)] + common, env)
            ours = run_json([binary, "--workload", name, "--batch", str(b)] + common, env)
            base = None
            if args.baseline_binary:
                base = run_json([args.baseline_binary, "--workload", name, "--batch", str(b)] + common, env)
            rows.append((name, b, pt, ours, base))
            print(f"{name:26s} batch {b:3d}: pytorch {pt['median_s']:8.3f} s {pt['peak_rss_mib']:7.0f} MiB   "
                  f"tuwen {ours['median_s']:8.3f} s {ours['peak_rss_mib']:7.0f} MiB   "
                  f"time ratio {ours['median_s'] / pt['median_s']:5.2f}"
                  + (f"   baseline {base['median_s']:8.3f} s (ratio {base['median_s'] / pt['median_s']:5.2f})"
                     if base else ""), flush=True)
            # Rewritten after every row, so that an interrupted run keeps what it measured.
            write_table(args, rows, time.time() - started)


def write_table(args, rows, elapsed):
    import torch
    import timm
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Benchmarks: tuwen vs PyTorch",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu} ({platform.machine()}), "
        f"{os.cpu_count()} cores, {args.threads} threads each, fp32, CPU; one run of `benches/compare_pytorch.py` "
        f"({elapsed / 60:.0f} min) alternating the two, every measurement in its own process; median of "
        f"{args.iters} timed runs after {args.warmup} warm-up (fewer for the largest workloads, see `PLAN`); "
        f"the second ratio compares each side's fastest run, which other tenants' load slows least.",
        f"PyTorch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}; "
        f"tuwen {commit}{' (with uncommitted changes)' if dirty else ''}. Load average (1/5/15 min) "
        f"at the start {'/'.join(f'{x:.1f}' for x in args.load_start)}, at the end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared).",
    ]
    with_base = any(r[4] for r in rows)
    head = ("| workload | batch | PyTorch s/batch | tuwen s/batch | time ratio (tuwen / PyTorch) | ratio of the "
            "fastest runs | PyTorch peak RSS MiB | tuwen peak RSS MiB | RSS ratio |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    if with_base:
        lines[-1] += f" The baseline is `{args.baseline_binary}`, timed right after tuwen on every row."
        head += " baseline s/batch | baseline / PyTorch | tuwen / baseline |"
        rule += "---|---|---|"
    lines += ["", head, rule]
    for name, b, pt, ours, base in rows:
        tp, to = pt["median_s"], ours["median_s"]
        fp, fo = pt["min_s"], ours["min_s"]
        mp, mo = pt["peak_rss_mib"], ours["peak_rss_mib"]
        row = (f"| {name} | {b} | {tp:.3f} | {to:.3f} | {to / tp:.2f} | {fo / fp:.2f} | {mp:.0f} | {mo:.0f} "
               f"| {mo / mp:.2f} |")
        if with_base:
            tb = base["median_s"]
            row += f" {tb:.3f} | {tb / tp:.2f} | {to / tb:.2f} |"
        lines.append(row)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
