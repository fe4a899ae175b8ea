"""The networks. Image models take normalized NCHW float32 and return logits [batch, 10].

`SimpleANN` and `SimpleCNN` are the original scripts' networks, kept layer for layer as the baselines;
`DigitsCNN`, `ResNet` and `Forecaster` are the ones the repository serves. `build_model` makes the network
a config asks for; its `ModelSpec` (class and constructor arguments) goes into the checkpoint, so the
network can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from training.config import CifarConfig, ClassifierConfig, RunConfig, SequenceConfig


class SimpleANN(nn.Module):
    """The seed MLP for 28x28 digits: 784-128-64-10 with ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class SimpleCNN(nn.Module):
    """The seed CNN for 32x32 RGB: two conv-ReLU-maxpool stages, then a 4096-512-10 MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv without bias (batch norm supplies it), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class DigitsCNN(nn.Module):
    """Two VGG-style blocks (conv-conv-pool, 32 then 64 channels) and a small classifier head.

    Batch norm lets Adam take large steps, dropout after each block and in the head keeps ~470k parameters
    from fitting 60k digits by rote; the 7x7 maps after two poolings still hold the strokes' layout.
    """

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32),
            conv_bn(32, 32),
            nn.MaxPool2d(2),
            nn.Dropout(dropout / 2),
            conv_bn(32, 64),
            conv_bn(64, 64),
            nn.MaxPool2d(2),
            nn.Dropout(dropout / 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128, bias=False),
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: two 3x3 convs and an identity shortcut (1x1 projection when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), section 4.2: depth 6n+2, three stages of n basic blocks.

    Stages work on 32x32, 16x16 and 8x8 maps with `width`, 2x and 4x channels, then global average pooling
    and one linear layer. The paper's width is 16; a wider net learns more per image, which is what a
    small training set needs.
    """

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn(3, width)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            # Zero the last norm of each residual branch: every block starts as the identity, which lets
            # a high learning rate train a deep stack from the first step (Goyal et al., 2017).
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


_RECURRENT: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class Forecaster(nn.Module):
    """A recurrent forecaster: history [batch, time] in, the next `horizon` values [batch, horizon] out.

    Each history is standardized by its own mean and standard deviation before the recurrent layers and
    the forecast is mapped back with the same two numbers, so the network only ever sees unit-scale
    shapes: series of any level or unit work, and serving needs no training statistics. The last hidden
    state predicts all `horizon` steps at once (no feedback of its own errors). Any length >= 2 works;
    a batch shares one length.
    """

    def __init__(self, cell: str, hidden: int = 64, layers: int = 2, horizon: int = 7, dropout: float = 0.0):
        super().__init__()
        if cell not in _RECURRENT:
            raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(_RECURRENT)}")
        self.cell = cell
        self.rnn = _RECURRENT[cell](
            input_size=1,
            hidden_size=hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        std = x.std(dim=1, keepdim=True, correction=0).clamp_min(1e-5)
        # An explicit initial state made from the input: tracing the default one bakes in the trace's device,
        # and the TorchScript artifact would then fail on a GPU.
        h0 = x.new_zeros(self.rnn.num_layers, x.shape[0], self.rnn.hidden_size)
        state = (h0, h0) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(((x - mean) / std).unsqueeze(-1), state)
        return self.head(out[:, -1]) * std + mean

    def exportable(self) -> Forecaster:
        """This forecaster in a form whose ONNX graph keeps the time axis dynamic.

        torch.export lowers LSTM and GRU layers to a loop over time, but unrolls a plain RNN and so fixes
        the length. An Elman RNN is a GRU whose update gate is shut and whose reset gate is open:
        h' = tanh(W_in x + b_in + W_hn h + b_hn). Saturated gate biases make that exact in float32, so an
        RNN forecaster exports as that GRU and computes the same function.
        """
        if self.cell != "rnn":
            return self
        rnn = self.rnn
        if not isinstance(rnn, nn.RNN) or rnn.nonlinearity != "tanh" or not rnn.bias:
            raise ValueError("only tanh RNN layers with biases have a GRU equivalent")
        gru = nn.GRU(rnn.input_size, rnn.hidden_size, rnn.num_layers, batch_first=rnn.batch_first)
        open_gate = 1e4  # sigmoid(1e4) == 1 and sigmoid(-1e4) == 0 exactly in float32
        with torch.no_grad():
            for layer in range(rnn.num_layers):
                w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
                b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
                h = rnn.hidden_size
                # GRU gate order is (reset r, update z, new n).
                gw_ih, gw_hh = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")
                gb_ih, gb_hh = getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}")
                for p in (gw_ih, gw_hh, gb_ih, gb_hh):
                    p.zero_()
                gb_ih[:h] = open_gate  # r = 1
                gb_ih[h : 2 * h] = -open_gate  # z = 0
                gw_ih[2 * h :] = w_ih
                gb_ih[2 * h :] = b_ih
                gw_hh[2 * h :] = w_hh
                gb_hh[2 * h :] = b_hh
        twin = copy.deepcopy(self)
        twin.rnn = gru.to(w_ih.device)
        twin.cell = "gru"
        return twin.train(self.training)


NETWORKS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (SimpleANN, SimpleCNN, DigitsCNN, ResNet, Forecaster)
}
_CLASSIFIERS: dict[tuple[str, str], type[nn.Module]] = {
    ("digits", "mlp"): SimpleANN,
    ("digits", "cnn"): DigitsCNN,
    ("cifar", "cnn"): SimpleCNN,
    ("cifar", "resnet"): ResNet,
}


@dataclass(frozen=True)
class ModelSpec:
    """A network's class name and all its constructor arguments, defaults included: everything but the weights."""

    cls: str
    args: dict[str, object]

    def build(self) -> nn.Module:
        if self.cls not in NETWORKS:
            raise ValueError(f"unknown network {self.cls!r}; known: {', '.join(NETWORKS)}")
        return NETWORKS[self.cls](**self.args)


def model_spec(cfg: RunConfig) -> ModelSpec:
    """The network a config trains: the classifier for its task and `arch`, or the forecaster for its `cell`."""
    if isinstance(cfg, SequenceConfig):
        if cfg.cell == "all":
            raise ValueError("a forecaster config names one cell; `all` trains one network per cell")
        cls: type[nn.Module] = Forecaster
        args: dict[str, object] = dict(
            cell=cfg.cell, hidden=cfg.hidden, layers=cfg.layers, horizon=cfg.horizon, dropout=cfg.dropout
        )
    elif isinstance(cfg, ClassifierConfig):
        if (cfg.name, cfg.arch) not in _CLASSIFIERS:
            raise ValueError(f"no architecture {cfg.arch!r} for task {cfg.name!r}")
        cls = _CLASSIFIERS[cfg.name, cfg.arch]
        resnet = cls is ResNet and isinstance(cfg, CifarConfig)
        args = dict(depth=cfg.resnet_depth, width=cfg.resnet_width) if resnet else {}  # type: ignore[attr-defined]
    else:
        raise TypeError(f"no network for {type(cfg).__name__}")
    # Defaults are recorded too: a checkpoint must not change meaning when a default changes later.
    bound = inspect.signature(cls).bind(**args)
    bound.apply_defaults()
    return ModelSpec(cls.__name__, dict(bound.arguments))


def build_model(cfg: RunConfig) -> nn.Module:
    """The untrained network for `cfg`, initialized from torch's current random state."""
    return model_spec(cfg).build()
