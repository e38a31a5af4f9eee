"""Train the shipped shapes models: ``python -m ngdm_core.shapes.training unet`` (or ``classifier``).

Everything comes from ``--seed``: the initial weights, the batches, the timesteps, the noise and
the class dropout. The learning rate is constant after a warm-up, so the checkpoint written
at step N is the model a run with ``--steps N`` ends with.
"""

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from ..rectifier import ddpm_alpha_bar, noised
from .data import HELD_OUT_SEED, TRAINING_SEED, make_batch
from .model import (CLASSIFIER_FILE, NULL_CLASS, UNET_FILE, ShapesClassifier, ShapesUNet, parameter_count,
                           save_model)

CLASS_DROPOUT = 0.1
WARMUP_STEPS = 200


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP_STEPS)


def _augmented(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Every class is mirror-symmetric about the vertical axis, so a flip keeps the label.
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, current in zip(ema.parameters(), model.parameters()):
            average.lerp_(current, 1 - decay)


def unet_loss(unet: ShapesUNet, images: torch.Tensor, labels: torch.Tensor, alpha_bar: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """DDPM's simple loss at uniform timesteps, with the class dropped to ``NULL_CLASS`` for CFG."""
    t = torch.randint(len(alpha_bar), (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    dropped = torch.rand(images.shape[0], generator=generator) < CLASS_DROPOUT
    labels = torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)
    return F.mse_loss(unet(noised(images, noise, t, alpha_bar), t, labels), noise)


def classifier_loss(classifier: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy on images with a little noise, so slightly soft edits are still judged by shape."""
    sigma = 0.15 * torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    noisy = images + sigma * torch.randn(images.shape, generator=generator)
    return F.cross_entropy(classifier(noisy), labels)


def accuracy(classifier: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(images).argmax(1) == labels).float().mean().item()


def train(kind: str, steps: int, batch_size: int, lr: float, seed: int, train_size: int, out: str,
          checkpoint_every: int, log=print) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = make_batch(TRAINING_SEED, train_size)
    held_out = make_batch(HELD_OUT_SEED, 2000) if kind == "classifier" else None
    model = ShapesUNet() if kind == "unet" else ShapesClassifier()
    ema = copy.deepcopy(model).requires_grad_(False)
    alpha_bar = ddpm_alpha_bar()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
    log(f"{kind}: {parameter_count(model)} parameters, {train_size} training images, {steps} steps of {batch_size}")
    started, recent = time.time(), []
    for step in range(steps):
        index = torch.randint(train_size, (batch_size,), generator=generator)
        images, labels = _augmented(data.images[index], generator), data.labels[index]
        if kind == "unet":
            loss = unet_loss(model, images, labels, alpha_bar, generator)
        else:
            loss = classifier_loss(model, images, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        _update_ema(ema, model, step, 0.999 if kind == "unet" else 0.99)
        recent = (recent + [loss.item()])[-200:]
        done = step + 1
        if done % 100 == 0 or done == steps:
            log(f"step {done}/{steps}  loss {sum(recent) / len(recent):.4f}  {time.time() - started:.0f} s")
        if done % checkpoint_every == 0 or done == steps:
            record = {"steps": done, "batch_size": batch_size, "lr": lr, "seed": seed, "train_size": train_size,
                      "final_loss": round(sum(recent) / len(recent), 5), "seconds": round(time.time() - started),
                      "threads": torch.get_num_threads()}
            if kind == "classifier":
                record["held_out_accuracy"] = round(accuracy(ema, held_out.images, held_out.labels), 4)
                log(f"held-out accuracy {record['held_out_accuracy']}")
            save_model(ema, out, training=record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("unet", "classifier"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--out", help="weights file (default: the shipped one)")
    args = parser.parse_args(argv)
    is_unet = args.kind == "unet"
    train(args.kind, args.steps or (4000 if is_unet else 1500), args.batch_size, args.lr or (1e-3 if is_unet else 2e-3),
          args.seed, args.train_size, args.out or str(UNET_FILE if is_unet else CLASSIFIER_FILE),
          args.checkpoint_every, log=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
