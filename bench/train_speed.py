"""`python -m bench.train_speed`: the seed MLP trained with the seed recipe on full MNIST, two ways, timed.

1. The original script's loop as it was: torchvision's MNIST with a per-sample ToTensor + Normalize
   transform, a DataLoader (batch 64, shuffled), SGD lr 0.01 momentum 0.9, cross-entropy, then test accuracy.
2. nnserve's training path for the same network and recipe: the data set held as one uint8 tensor,
   batches drawn by indexing and normalized whole.

Both times include reading the data and measuring test accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from training.config import DEFAULT_DATA_DIR, DigitsConfig
from training.data import load_mnist
from training.nets import SimpleANN
from training.train import accuracy, fit_classifier, resolve_device


def seed_way(data_dir: Path, epochs: int) -> tuple[float, float]:
    """The original loop, kept as written; returns (seconds, test accuracy)."""
    start = time.perf_counter()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train_set = datasets.MNIST(root=str(data_dir), train=True, download=False, transform=transform)
    test_set = datasets.MNIST(root=str(data_dir), train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False)

    model = SimpleANN()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(epochs):
        model.train()
        running_loss = 0.0
        for images, labels in train_loader:
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        print(f"seed loop epoch {epoch + 1}/{epochs}, loss {running_loss / len(train_loader):.4f}", flush=True)

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            _, predicted = torch.max(model(images), 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return time.perf_counter() - start, correct / total


def nnserve_way(data_dir: Path, epochs: int, device: str, seed: int) -> tuple[float, float]:
    """`python -m training digits --arch mlp` without the export; returns (seconds, test accuracy)."""
    start = time.perf_counter()
    cfg = DigitsConfig.recipe("mlp", epochs=epochs, data_dir=data_dir, device=device, seed=seed, baseline=False)
    train, test = load_mnist(data_dir)
    target = resolve_device(device)
    fit = fit_classifier(cfg, train, test, target)
    return time.perf_counter() - start, accuracy(fit.model, test.to(target), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs for both (the seed recipe: 10)")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="holds MNIST/raw (default: %(default)s)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="for nnserve's path")
    parser.add_argument("--seed", type=int, default=0, help="seeds both runs (final accuracy varies by ~0.3 points)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)

    torch.manual_seed(args.seed)
    seed_s, seed_acc = seed_way(args.data_dir, args.epochs)
    ours_s, ours_acc = nnserve_way(args.data_dir, args.epochs, args.device, args.seed)

    print(f"\nSimpleANN, seed recipe, {args.epochs} epochs on MNIST (60,000 train / 10,000 test)")
    print(f"  seed loop (DataLoader + ToTensor): {seed_s:8.1f} s   test accuracy {seed_acc:.2%}")
    print(f"  nnserve (in-memory tensors, {args.device}): {ours_s:8.1f} s   test accuracy {ours_acc:.2%}")
    print(f"  speedup: {seed_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
