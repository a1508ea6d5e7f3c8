"""ResNet-18 on CIFAR-10-shaped data with ``devlayer.Trainer``: the usual hand-written DDP
script (init_process_group, LOCAL_RANK, DistributedSampler + set_epoch, batch // world,
AMP, barrier, averaged validation, early stopping, throughput) in one Trainer call.

Nothing in it names a vendor or a launcher:

    python examples/cifar_resnet.py --epochs 2                          # one device
    torchrun --standalone --nproc-per-node=4 examples/cifar_resnet.py   # 4 devices, one node
    srun python examples/cifar_resnet.py                                # one rank per task
    DEVLAYER_BACKEND=xpu torchrun ... examples/cifar_resnet.py          # force Intel GPUs

By default the data is synthetic (``--samples`` 3x32x32 images whose class sets their mean
colour, plus noise; the same on every run for a seed), so the script runs anywhere without
a download. With torchvision installed, ``--data DIR`` trains on the real CIFAR-10 found in
DIR (torchvision's ``cifar-10-batches-py`` layout; nothing is downloaded).

Throughput: pass the samples/s of a 1-device run as ``--reference-throughput`` to get the
scaling efficiency, ``throughput / (world_size * reference)``.

Past DDP: ``--strategy fsdp`` shards the model (each ``BasicBlock`` one FSDP unit) and writes
sharded checkpoints; ``--compile`` runs ``torch.compile``; ``--export model.pt`` writes the
trained weights as one file for inference::

    torchrun --standalone --nproc-per-node=2 examples/cifar_resnet.py --strategy fsdp \
        --checkpoint-dir ckpt --export model.pt
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import devlayer

# ---------------------------------------------------------------------------- the model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (the ResNet-18/34 block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stem (no max-pool), 4 stages of 2 blocks.

    Args:
        num_classes: Output classes.
        width: Channels of the first stage (64 is the standard ResNet-18; the stages use
            width, 2*width, 4*width, 8*width). A small width makes a tiny model for tests.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------- the data


class SyntheticCifar(Dataset):
    """CIFAR-10-shaped images whose class is learnable: a class colour plus noise.

    Sample ``i`` is made from its own generator seeded with ``(seed, i)``, so the data is the
    same on every rank, in every DataLoader worker and on every run, without storing it.
    """

    def __init__(self, n: int, *, seed: int = 0, num_classes: int = 10, noise: float = 1.0):
        self.n, self.seed, self.num_classes, self.noise = n, seed, num_classes, noise
        g = torch.Generator().manual_seed(12345)  # the class colours: fixed for all splits
        self.colours = torch.randn(num_classes, 3, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        noise = torch.randn(3, 32, 32, generator=g) * self.noise
        return self.colours[label].view(3, 1, 1) + noise, label


def cifar10(root: str) -> tuple[Dataset, Dataset]:
    """The real CIFAR-10 train and test splits from ``root`` (torchvision, no download)."""
    import torchvision
    from torchvision import transforms as T

    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    test_tf = T.Compose([T.ToTensor(), norm])
    return (
        torchvision.datasets.CIFAR10(root, train=True, transform=train_tf, download=False),
        torchvision.datasets.CIFAR10(root, train=False, transform=test_tf, download=False),
    )


# ---------------------------------------------------------------------------- training


def overall_throughput(history: list[dict]) -> tuple[float, float]:
    """(samples/s over all epochs of this run, seconds) from the Trainer's history."""
    seconds = sum(m["epoch_time"] for m in history)
    samples = sum(m["samples_per_sec"] * m["epoch_time"] for m in history)
    return (samples / seconds if seconds > 0 else 0.0), seconds


def main(args: argparse.Namespace) -> None:
    with devlayer.init(backend=args.backend) as st:
        if args.data:
            train_data, val_data = cifar10(args.data)
        else:
            train_data = SyntheticCifar(args.samples, seed=args.seed)
            val_data = SyntheticCifar(max(args.samples // 5, 1), seed=args.seed + 1)
        batch_size = args.batch_size or 128 * st.world_size
        if st.is_main:
            p = st.process
            print(
                f"{st.world_size} rank(s) on {p.num_nodes} node(s), {p.local_world_size} per "
                f"node; backend {st.backend}, device {st.device.type}, comm {st.comm or '-'}; "
                f"global batch {batch_size} = {batch_size // st.world_size} per rank",
                flush=True,
            )

        torch.manual_seed(args.seed)  # the same initial weights for every world size
        model = ResNet18(num_classes=10, width=args.width)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        trainer = devlayer.Trainer(
            model,
            optimizer,
            F.cross_entropy,  # validation reports val_loss and val_accuracy from it
            batch_size=batch_size,  # GLOBAL: split over ranks by the Trainer
            lr_scaling=args.lr_scaling,  # "linear": lr * world_size, once, at the start
            precision=args.precision,  # None: ACCELERATE_MIXED_PRECISION or "32"
            max_epochs=args.epochs,
            early_stopping=devlayer.train.EarlyStopping(
                monitor="val_accuracy",
                mode="max",
                target=args.target_accuracy,  # None: stop after `patience` flat epochs
                patience=args.patience,
            ),
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume="auto",  # newest valid checkpoint in checkpoint_dir, if any
            metrics_file=args.metrics_file,
            reference_throughput=args.reference_throughput,
            num_workers=args.num_workers,
            seed=args.seed,
            strategy=args.strategy,  # "fsdp": shards; the same line on every vendor
            fsdp={"modules": (BasicBlock,)} if args.strategy == "fsdp" else None,
            compile=args.compile,
        )
        history = trainer.fit(train_data, val_data)
        if args.export:
            trainer.export(args.export)  # every rank: under FSDP the shards are gathered
            if st.is_main:
                print(f"exported the trained weights to {args.export}", flush=True)

        if st.is_main:
            throughput, seconds = overall_throughput(history)
            last = history[-1] if history else {}
            if trainer.stopped_early:
                print(f"early stop after epoch {last['epoch']}", flush=True)
            print(
                f"summary: {len(history)} epoch(s) in {seconds:.2f}s | val_accuracy "
                f"{last.get('val_accuracy', float('nan')):.4f} | throughput "
                f"{throughput:.1f} samples/s | world_size {st.world_size}",
                flush=True,
            )
            if args.reference_throughput:
                eff = throughput / (st.world_size * args.reference_throughput)
                print(
                    f"scaling efficiency {eff:.1%} (speed-up "
                    f"{throughput / args.reference_throughput:.2f}x on {st.world_size} ranks)",
                    flush=True,
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ResNet-18 on CIFAR-10-shaped data with devlayer.Trainer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="GLOBAL samples per optimizer step (default: 128 per rank, so that it grows "
        "with the number of ranks as the lr does under --lr-scaling linear)",
    )
    parser.add_argument(
        "--lr", type=float, default=0.01, help="base (1-rank) learning rate, see --lr-scaling"
    )
    parser.add_argument(
        "--lr-scaling",
        default="linear",
        choices=["linear", "sqrt", "none"],
        help="multiply the lr by world_size (linear) or its square root, once",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="32, bf16-mixed or 16-mixed (default: ACCELERATE_MIXED_PRECISION or 32)",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop after --patience epochs in a row at or above this val_accuracy",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=3,
        help="with --target-accuracy: epochs at target; without: epochs with no improvement",
    )
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--samples", type=int, default=10_000, help="synthetic training images")
    parser.add_argument("--data", default=None, help="a CIFAR-10 folder (needs torchvision)")
    parser.add_argument(
        "--reference-throughput",
        type=float,
        default=None,
        help="samples/s of a 1-rank run; prints the scaling efficiency",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="save and resume here")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="optimizer steps")
    parser.add_argument("--metrics-file", default=None, help="JSON lines, one per epoch")
    parser.add_argument("--num-workers", default="auto", help="DataLoader workers per rank")
    parser.add_argument("--backend", default=None, help="cuda, xpu, mps, cpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategy", default="ddp", choices=["ddp", "fsdp"], help="replicate or shard"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--export", default=None, help="write the trained weights here")
    args = parser.parse_args(argv)
    if args.lr_scaling == "none":
        args.lr_scaling = None
    if args.backend in ("auto", ""):
        args.backend = None
    if args.num_workers != "auto":
        args.num_workers = int(args.num_workers)
    if args.data and importlib.util.find_spec("torchvision") is None:
        parser.error("--data needs torchvision (pip install torchvision) to read CIFAR-10")
    return args


if __name__ == "__main__":
    main(parse_args())
