"""Train the shipped shapes models: ``python -m ngdm_core.shapes.training unet`` (or ``classifier``).

Everything comes from ``--seed``: the initial weights, the batches, the timesteps, the noise and
the class dropout. The learning rate is constant after a warm-up, so the checkpoint written
at step N is the model a run with ``--steps N`` ends with.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

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


def _state_path(out) -> Path:
    """Where a run keeps what it needs to resume: next to its weights, never shipped."""
    out = Path(out)
    return out.with_name(out.stem + ".train-state.pt")


def _remaining(seconds: float, done: int, first: int, steps: int) -> str:
    rate = seconds / max(done - first, 1)
    return f"{seconds:.0f} s, about {rate * (steps - done):.0f} s left"


def train(kind: str, steps: int, batch_size: int, lr: float, seed: int, train_size: int, out: str,
          checkpoint_every: int, threads: int, resume: bool = False, log=print) -> None:
    """Train ``kind`` and write its EMA weights to ``out`` every ``checkpoint_every`` steps and at the end.

    With ``resume``, the run continues from the state saved beside ``out`` by an earlier run with
    the same settings, and ends as one uninterrupted run would.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = make_batch(TRAINING_SEED, train_size)
    held_out = make_batch(HELD_OUT_SEED, 2000) if kind == "classifier" else None
    model = ShapesUNet() if kind == "unet" else ShapesClassifier()
    ema = copy.deepcopy(model).requires_grad_(False)
    alpha_bar = ddpm_alpha_bar()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
    settings = {"kind": kind, "batch_size": batch_size, "lr": lr, "seed": seed, "train_size": train_size}
    first, recent, spent = 0, [], 0.0
    if resume:
        state = torch.load(_state_path(out), weights_only=False)
        if state["settings"] != settings:
            raise ValueError(f"--resume: {_state_path(out)} was saved with {state['settings']}, not {settings}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        first, recent, spent = state["step"], state["recent"], state["seconds"]
        log(f"resuming at step {first} from {_state_path(out)}")
    log(f"{kind}: {parameter_count(model)} parameters, {train_size} training images, {steps} steps of {batch_size}, "
        f"{threads} threads; writing {Path(out).resolve()}")
    started = time.time() - spent
    for step in range(first, steps):
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
        elapsed = time.time() - started
        if done % 100 == 0 or done == steps:
            log(f"step {done}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{_remaining(elapsed - spent, done, first, steps)}")
        if done % checkpoint_every == 0 or done == steps:
            record = {"steps": done, **settings, "final_loss": round(sum(recent) / len(recent), 5),
                      "seconds": round(elapsed), "threads": threads}
            if kind == "classifier":
                record["held_out_accuracy"] = round(accuracy(ema, held_out.images, held_out.labels), 4)
                log(f"held-out accuracy {record['held_out_accuracy']}")
            save_model(ema, out, training=record)
            torch.save({"settings": settings, "step": done, "recent": recent, "seconds": elapsed,
                        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state()}, _state_path(out))
            log(f"wrote {Path(out).resolve()} (step {done})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("kind", choices=("unet", "classifier"))
    parser.add_argument("--steps", type=int, help="default: 4000 for the U-Net, 1500 for the classifier")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="default: 1e-3 for the U-Net, 2e-3 for the classifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    # Two threads fill this project's 2-core machines; more contend with themselves.
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--resume", action="store_true", help="continue the run whose state is beside --out")
    parser.add_argument("--out", help="weights file (default: shapes_<kind>.safetensors in the working folder; "
                                      f"the shipped ones are {UNET_FILE} and {CLASSIFIER_FILE})")
    args = parser.parse_args(argv)
    is_unet = args.kind == "unet"
    train(args.kind, args.steps or (4000 if is_unet else 1500), args.batch_size, args.lr or (1e-3 if is_unet else 2e-3),
          args.seed, args.train_size, args.out or f"shapes_{args.kind}.safetensors", args.checkpoint_every,
          args.threads, args.resume, log=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
