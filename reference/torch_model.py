"""The original PyTorch model and its training step: the one home of the reference in torch.

Imported by the benchmarks (``benchmarks/train_step.py --torch``,
``benchmarks/torch_original.py``) and by the fixture scripts (``scripts/
make_parity_reference.py``). Torch-only (no JAX import), so that a benchmark worker measures
PyTorch's own memory. ``docs/reference.md`` describes the behaviour in words.
``MultiInputModule`` is the reference classifier: torchvision ``efficientnet_b0().features``
(shared, called once per input), a shared Linear(1280 -> 128), one ``nn.MultiheadAttention``
per input, shared LayerNorms / FFN and the dropout-MLP classifier. ``make_train_step`` is the reference
optimisation step: weighted cross-entropy, backward, ``clip_grad_norm_(1.0)``, Adam,
``OneCycleLR`` stepped per batch. ``Encoder`` is the trunk alone (torchvision or timm names)
with global average pooling, for the encoder parity fixtures.

torchvision's compiled ops are missing beside some CPU torch builds; :func:`import_torchvision`
declares the two it needs at import time so that the pure-Python models load.
"""
from __future__ import annotations

import torch
from torch import nn


def import_torchvision():
    """Import torchvision, declaring ``torchvision::nms`` / ``qnms`` first if its C ops are absent."""
    try:
        import torchvision
    except (RuntimeError, ImportError):
        for name in ("nms", "qnms"):
            torch.library.define(f"torchvision::{name}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


class MultiInputModule(nn.Module):
    """The reference PyTorch model (docs/reference.md); ``forward(x (B, N, 3, H, W))``."""

    def __init__(self, num_inputs: int, num_classes: int = 2, embed: int = 128, heads: int = 8,
                 ffn: int = 512, dropout: float = 0.5):
        super().__init__()
        torchvision = import_torchvision()
        self.feature_extractor = torchvision.models.efficientnet_b0().features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(1280, embed)
        self.attention_layers = nn.ModuleList([
            nn.MultiheadAttention(embed, heads, dropout=dropout, batch_first=True)
            for _ in range(num_inputs)])
        self.norm1 = nn.LayerNorm(embed)
        self.norm2 = nn.LayerNorm(embed)
        self.ffn = nn.Sequential(nn.Linear(embed, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, embed))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed * num_inputs, embed),
                                        nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(embed, num_classes))

    def forward(self, x):  # x: (B, N, 3, H, W)
        # The shared backbone runs once per input, in input order, as in the original: in
        # training every BatchNorm normalises input i with its own batch statistics and
        # updates its running averages N times per step (docs/reference.md §3).
        feats = [self.pool(self.feature_extractor(x[:, i])).flatten(1) for i in range(x.shape[1])]
        tokens = self.proj(torch.stack(feats, dim=1))                     # (B, N, E)
        fused, attn = [], []
        for i, mha in enumerate(self.attention_layers):
            q = tokens[:, i:i + 1]
            att, w = mha(q, tokens, tokens)
            h = self.norm1(att + q)
            h = self.norm2(h + self.ffn(h))
            fused.append(h[:, 0])
            attn.append(w[:, 0])
        return self.classifier(torch.cat(fused, dim=1)), torch.stack(attn, dim=1)


class Encoder(nn.Module):
    """A torchvision or timm EfficientNet-B0 trunk + global average pooling (timm imported
    only for ``kind='timm'``)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("torchvision", "timm"):
            raise ValueError(f"Encoder kind must be 'torchvision' or 'timm'; got {kind!r}.")
        self.kind = kind
        if kind == "torchvision":
            self.net = import_torchvision().models.efficientnet_b0()
        else:
            import timm
            self.net = timm.create_model("efficientnet_b0", pretrained=False)

    def forward(self, x):
        if self.kind == "torchvision":
            return self.net.avgpool(self.net.features(x)).flatten(1)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def make_train_step(model: nn.Module, class_weights: torch.Tensor, total_steps: int,
                    max_lr: float = 3e-4, clip: float = 1.0, on_step=None,
                    autocast: torch.dtype | None = None):
    """The reference training step as a closure ``step(images, labels) -> loss``.

    ``on_step(logits, loss)``, if given, is called after the backward pass and before
    clipping (the parameters' ``.grad`` then hold the raw gradients). ``autocast``
    (e.g. ``torch.bfloat16``): the forward pass under CPU autocast, the loss in float32.
    """
    opt = torch.optim.Adam(model.parameters(), lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            logits, _ = model(images)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        if on_step is not None:
            on_step(logits.detach(), loss.detach())
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        return float(loss.detach())

    return step
