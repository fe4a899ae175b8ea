"""Training: data loading, networks, the manifest contract, export parity, and a short real run end to end."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import models
from models import Manifest
from tests.data import cifar_test, data_dir, mnist_test
from training import data
from training.__main__ import build_parser, config_from_args, main
from training.checkpoint import KEYS, load_checkpoint, load_model
from training.config import CifarConfig, DigitsConfig, SequenceConfig
from training.data import (
    CIFAR10_LABELS,
    DataError,
    augment,
    load_cifar10,
    load_mnist,
    load_weather,
)
from training.export import ExportError, export_version
from training.nets import DigitsCNN, Forecaster, ResNet, SimpleANN, SimpleCNN, build_model, model_spec
from training.train import run

# ------------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(data_dir())


def test_mnist_is_held_as_uint8_nchw_tensors(mnist) -> None:
    train, test = mnist
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and set(train.labels.unique().tolist()) == set(range(10))
    # torchvision's reader and a plain IDX reader see the same digits in the same order.
    images, labels = mnist_test()
    assert np.array_equal(test.images[:, 0].numpy(), images) and np.array_equal(test.labels.numpy(), labels)


def test_cifar_subset_is_read_in_cifar10_class_order() -> None:
    train, test, name = load_cifar10(data_dir())
    assert name == "CIFAR-10 subset"
    assert train.images.shape == (5_170, 3, 32, 32) and test.images.shape == (517, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert CIFAR10_LABELS == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert np.bincount(train.labels.numpy(), minlength=10).min() > 400
    images, labels = cifar_test()  # Pillow alone, class by class in CIFAR-10 order
    assert np.array_equal(test.images.permute(0, 2, 3, 1).numpy(), images)
    assert np.array_equal(test.labels.numpy(), labels)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _image_folders(root: Path, classes: tuple[str, ...], splits: tuple[str, ...] = ("train", "test")) -> Path:
    for split in splits:
        for i, name in enumerate(classes):
            (root / "cifar10-subset" / split / name).mkdir(parents=True)
            (root / "cifar10-subset" / split / name / f"{i:05d}.png").write_bytes(_png(i))
    return root


def test_cifar_image_folders_of_any_size_load(tmp_path: Path) -> None:
    train, test, _ = load_cifar10(_image_folders(tmp_path, CIFAR10_LABELS))
    assert train.labels.tolist() == list(range(10)) and test.images.shape == (10, 3, 32, 32)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing class", "expected exactly"),
        ("missing test split", r"test is missing"),
        ("corrupt image", "not a readable image"),
        ("unreadable torchvision batches", "reading it failed"),
    ],
)
def test_bad_cifar_dirs_say_what_was_expected(tmp_path: Path, breakage: str, message: str) -> None:
    if breakage == "missing class":
        _image_folders(tmp_path, CIFAR10_LABELS[:-1])
    elif breakage == "missing test split":
        _image_folders(tmp_path, CIFAR10_LABELS, splits=("train",))
    elif breakage == "corrupt image":
        _image_folders(tmp_path, CIFAR10_LABELS)
        (tmp_path / "cifar10-subset" / "train" / "cat" / "00003.png").write_bytes(b"not a png")
    else:
        (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match=message):
        load_cifar10(tmp_path)


def test_truncated_mnist_says_what_was_expected(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 60_000), ("t10k", 10_000)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 0x803, n, 28, 28) + b"\0" * 100)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, n) + b"\0" * 100)
    with pytest.raises(DataError, match=r"expected .*MNIST/raw/.*t10k-images-idx3-ubyte.*could not read it"):
        load_mnist(tmp_path)


def test_missing_weather_csv_names_the_expected_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The series ships with the package; only a data folder without it and no bundled copy is an error.
    monkeypatch.setattr(data, "BUNDLED_WEATHER_CSV", tmp_path / "absent.csv")
    with pytest.raises(DataError, match=r"absent\.csv is missing"):
        load_weather(tmp_path)


def test_weather_series_is_four_consecutive_years() -> None:
    series = load_weather(data_dir())
    assert len(series.values) == 1_461 and series.values.dtype == np.float32
    assert series.dates[0].isoformat() == "2012-01-01" and series.dates[-1].isoformat() == "2015-12-31"


def test_augment_translates_and_flips_whole_images() -> None:
    torch.manual_seed(0)
    images = torch.from_numpy(cifar_test()[0][:16]).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(augment(images, 0, False), images)
    flipped = augment(images, 0, True)
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(2)) for f, x in zip(flipped, images, strict=True))
    assert not torch.equal(flipped, images)
    shifted = augment(images, 4, False)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for s, p in zip(shifted, padded, strict=True):
        assert any(torch.equal(s, p[:, dy : dy + 32, dx : dx + 32]) for dy in range(9) for dx in range(9))


# -------------------------------------------------------------------------------------------------- networks


def test_seed_networks_keep_their_exact_layers() -> None:
    ann, cnn = SimpleANN(), SimpleCNN()
    assert [tuple(m.weight.shape) for m in (ann.fc1, ann.fc2, ann.fc3)] == [(128, 784), (64, 128), (10, 64)]
    assert sum(p.numel() for p in ann.parameters()) == 109_386
    assert tuple(cnn.conv1.weight.shape) == (32, 3, 3, 3) and tuple(cnn.conv2.weight.shape) == (64, 32, 3, 3)
    assert tuple(cnn.fc1.weight.shape) == (512, 4096) and tuple(cnn.fc2.weight.shape) == (10, 512)


@pytest.mark.parametrize(
    ("net", "shape"),
    [
        (SimpleANN(), (5, 1, 28, 28)),
        (DigitsCNN(), (5, 1, 28, 28)),
        (SimpleCNN(), (5, 3, 32, 32)),
        (ResNet(20, 16), (5, 3, 32, 32)),
    ],
)
def test_classifiers_return_ten_logits(net: torch.nn.Module, shape: tuple[int, ...]) -> None:
    assert net.eval()(torch.randn(shape)).shape == (5, 10)


def test_resnet_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(depth=21)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_forecaster_takes_any_length_and_any_scale(cell: str) -> None:
    torch.manual_seed(0)
    model = Forecaster(cell, hidden=16).eval()
    history = torch.from_numpy(load_weather(data_dir()).values[:400]).unfold(0, 30, 10)[:8]  # [8, 30]
    with torch.no_grad():
        for length in (2, 14, 30):
            assert model(history[:, -length:]).shape == (8, 7)
        # Standardizing each window inside the model: Fahrenheit in, Fahrenheit out.
        fahrenheit = model(history * 1.8 + 32)
        assert torch.allclose(fahrenheit, model(history) * 1.8 + 32, atol=1e-3)


def test_rnn_export_twin_computes_the_same_function() -> None:
    torch.manual_seed(0)
    model = Forecaster("rnn", hidden=16, layers=2).eval()
    twin = model.exportable()
    assert isinstance(twin.rnn, torch.nn.GRU) and isinstance(model.rnn, torch.nn.RNN)
    x = torch.randn(4, 50) * 5 + 10
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "cls", "args"),
    [
        (DigitsConfig.recipe("mlp"), "SimpleANN", {}),
        (DigitsConfig.recipe("cnn"), "DigitsCNN", {"dropout": 0.25}),
        (CifarConfig.recipe("cnn"), "SimpleCNN", {}),
        (CifarConfig.recipe("resnet"), "ResNet", {"depth": 20, "width": 32, "num_classes": 10}),
        (
            SequenceConfig(cell="lstm", layers=2),
            "Forecaster",
            {"cell": "lstm", "hidden": 64, "layers": 2, "horizon": 7, "dropout": 0.0},
        ),
    ],
)
def test_a_model_spec_rebuilds_the_network_a_config_trains(cfg, cls: str, args: dict) -> None:
    spec = model_spec(cfg)
    assert (spec.cls, spec.args) == (cls, args)  # every constructor argument, defaults included
    torch.manual_seed(0)
    trained = build_model(cfg)
    rebuilt = spec.build()
    assert type(rebuilt).__name__ == cls
    rebuilt.load_state_dict(trained.state_dict())  # strict: same layers, same shapes


def test_a_forecaster_spec_needs_one_cell() -> None:
    with pytest.raises(ValueError, match="one cell"):
        model_spec(SequenceConfig(cell="all"))


# ---------------------------------------------------------------------------------------------- the manifest


@pytest.fixture(scope="module")
def good_manifest() -> dict:
    return json.loads((models.DEFAULT_ROOT / "digits" / "1" / "manifest.json").read_text())


def test_a_committed_manifest_validates(good_manifest: dict) -> None:
    assert Manifest.model_validate(good_manifest).metric("accuracy").n_items == 10_000


@pytest.mark.parametrize(
    "breakage",
    ["no labels", "three means for grayscale", "bad sha256", "unknown field", "forecast without series", "bad version"],
)
def test_broken_manifests_are_rejected(good_manifest: dict, breakage: str) -> None:
    bad = json.loads(json.dumps(good_manifest))
    if breakage == "no labels":
        bad["labels"] = None
    elif breakage == "three means for grayscale":
        bad["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    elif breakage == "bad sha256":
        bad["artifacts"]["onnx"]["sha256"] = "abc"
    elif breakage == "unknown field":
        bad["accuracy"] = 0.99
    elif breakage == "forecast without series":
        bad["task"] = "forecast"
    else:
        bad["version"] = "v1"
    with pytest.raises(ValidationError):
        Manifest.model_validate(bad)


# ------------------------------------------------------------------------------------- runs, export, the CLI


def test_cli_picks_each_recipe() -> None:
    seed = config_from_args(build_parser().parse_args(["digits", "--arch", "mlp"]))
    assert isinstance(seed, DigitsConfig)
    assert (seed.optimizer, seed.lr, seed.momentum, seed.batch_size, seed.epochs) == ("sgd", 0.01, 0.9, 64, 10)
    assert (seed.mean, seed.std, seed.pad, seed.schedule) == ((0.5,), (0.5,), 0, "constant")
    strong = config_from_args(build_parser().parse_args(["cifar", "--epochs", "3", "--no-baseline"]))
    assert isinstance(strong, CifarConfig) and strong.arch == "resnet" and strong.epochs == 3
    assert strong.flip and strong.pad == 4 and strong.label_smoothing > 0 and not strong.baseline
    seq = config_from_args(build_parser().parse_args(["sequence", "--cell", "gru", "--device", "cpu"]))
    assert isinstance(seq, SequenceConfig) and seq.cells == ("gru",) and seq.device == "cpu"


def test_cli_trains_then_exports_and_records_its_command(tmp_path: Path) -> None:
    train = [
        "digits",
        "--arch",
        "mlp",
        "--epochs",
        "1",
        "--max-train-items",
        "2000",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(data_dir()),
        "--no-export",
    ]
    main(train)
    assert models.versions(tmp_path, "digits") == [] and (tmp_path / "digits" / "1" / "checkpoint.pt").is_file()
    main(["export", str(tmp_path / "digits" / "1"), "--data-dir", str(data_dir())])
    manifest = models.load(tmp_path, "digits").manifest
    assert manifest.training.command == "python -m training " + " ".join(train)
    assert manifest.architecture.startswith("mlp: SimpleANN") and manifest.training.epochs == 1
    with pytest.raises(FileExistsError, match="already exists"):
        main([*train, "--version", "1"])
    main(train[:-1])  # without --no-export: trained and exported in one command
    assert models.versions(tmp_path, "digits") == ["1", "2"]
    assert models.load(tmp_path, "digits", "2").manifest.training.command == "python -m training " + " ".join(
        train[:-1]
    )


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The strong digits recipe, cut to 3,000 real training images and 2 epochs, stopped before export."""
    out = tmp_path_factory.mktemp("repo")
    cfg = DigitsConfig.recipe(
        "cnn", epochs=2, max_train_items=3_000, baseline=False, device="cpu", out=out, data_dir=data_dir()
    )
    return run(cfg, command="python -m training digits --epochs 2 --max-train-items 3000 --no-baseline --no-export")


def test_short_run_learns_then_exports_and_round_trips(trained_digits: Path) -> None:
    root = trained_digits.parents[1]
    assert models.versions(root, "digits") == [] and models.next_version(root, "digits") == "2"
    ckpt = load_checkpoint(trained_digits)
    assert set(ckpt) == KEYS and (ckpt["model_class"], ckpt["model_args"]) == ("DigitsCNN", {"dropout": 0.25})
    losses = ckpt["curves"]["loss"]["train"]
    assert losses[-1] < losses[0] and ckpt["curves"]["accuracy"]["test"][-1] > 0.9

    manifest = export_version(trained_digits, data_dir())
    mv = models.load(root, "digits")
    mv.verify()
    assert mv.manifest == manifest and mv.manifest.version == "1"
    assert manifest.training.n_train_items == 3_000 and "first 3,000" in manifest.training.dataset
    assert manifest.metric("accuracy").value > 0.9 and manifest.metric("accuracy").baseline is None
    assert (trained_digits / "curves.png").stat().st_size > 0 and (trained_digits / "confusion.png").stat().st_size > 0

    images, _ = mnist_test()
    x = models.normalize(images[:32, None], manifest.preprocessing)  # type: ignore[arg-type]
    with torch.no_grad():
        eager = load_model(ckpt)(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(mv.artifact_path("onnx")), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["output"], {"input": x})[0] - eager).max() <= 1e-4


def test_a_failed_parity_check_writes_nothing_final(trained_digits: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "digits" / "1"
    copy.mkdir(parents=True)
    shutil.copy(trained_digits / "checkpoint.pt", copy)
    monkeypatch.setattr("training.export.ONNX_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match=r"ONNX Runtime differs from eager PyTorch by up to .* \(limit -1\)"):
        export_version(copy, data_dir())
    assert sorted(p.name for p in copy.iterdir()) == ["checkpoint.pt"]
    assert models.versions(tmp_path, "digits") == []


def test_forecaster_exports_with_dynamic_batch_and_time(tmp_path: Path) -> None:
    cfg = SequenceConfig(
        cell="rnn",
        epochs=1,
        steps_per_epoch=5,
        max_history=60,
        eval_history=60,
        device="cpu",
        out=tmp_path,
        data_dir=data_dir(),
    )
    path = run(cfg, command="python -m training sequence --cell rnn")
    assert models.versions(tmp_path, "sequence") == []  # a run trains; export makes the version
    export_version(path, data_dir())
    mv = models.load(tmp_path, "sequence")
    mv.verify()
    assert mv.manifest.series == models.SeriesSpec(
        min_history=14, max_history=60, horizon=7, target="temp_max (degrees C)"
    )
    assert mv.manifest.input.shape == ["batch", "time"] and mv.manifest.output.shape == ["batch", 7]
    assert {m.name for m in mv.manifest.metrics} >= {"rmse_7d_avg", "rmse_1d", "rmse_7d_avg_rnn"}
    model = load_model(load_checkpoint(path))
    session = ort.InferenceSession(str(mv.artifact_path("onnx")), providers=["CPUExecutionProvider"])
    values = load_weather(data_dir()).values
    for length, batch in ((14, 1), (37, 5), (60, 9)):
        x = np.stack([values[i : i + length] for i in range(0, 40 * batch, 40)])
        with torch.no_grad():
            eager = model(torch.from_numpy(x)).numpy()
        assert np.abs(session.run(["output"], {"input": x})[0] - eager).max() <= 1e-4


@pytest.mark.parametrize("name", ["digits", "cifar", "sequence"])
def test_committed_checkpoints_export_to_their_manifests(name: str, tmp_path: Path) -> None:
    """The bundled checkpoints hold the network's constructor arguments and re-export to the same figures."""
    committed = models.load(models.DEFAULT_ROOT, name, "1")
    ckpt = load_checkpoint(committed.path)
    assert set(ckpt) == KEYS and ckpt["model_class"] in {"DigitsCNN", "ResNet", "Forecaster"}
    copy = tmp_path / name / "1"
    copy.mkdir(parents=True)
    shutil.copy(committed.path / "checkpoint.pt", copy)
    manifest = export_version(copy, data_dir())
    same = ("architecture", "description", "input", "output", "preprocessing", "series", "labels", "training")
    assert {k: getattr(manifest, k) for k in same} == {k: getattr(committed.manifest, k) for k in same}
    for metric in committed.manifest.metrics:
        assert manifest.metric(metric.name).value == pytest.approx(metric.value, abs=1e-3), metric.name
