"""Model smoke check (the quickstart until the trainer lands): trains the tiny presets of every
architecture (Doge dense and MoE, GLM-4, JetMoE) for a few dozen AdamW steps on byte tokens of text every Python install ships (its standard
library sources), shows the loss falling, saves each as a Hugging Face directory, reloads it and
checks the logits are identical.

    python -m train.smoke [--steps 40] [--out outputs/smoke]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
import yaml

import models

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("doge-tiny", "doge-tiny-moe", "glm4-tiny", "jetmoe-tiny")


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Bytes of the interpreter's own standard library sources: real text, no download."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def train_preset(name: str, tokens: torch.Tensor, steps: int, out: Path, seq: int = 128, batch: int = 8) -> None:
    values = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    model = models.build(values)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    held_out = tokens[-(batch * (seq + 1)) :].view(batch, seq + 1)
    train = tokens[: -(batch * (seq + 1))]

    def eval_loss() -> float:
        with torch.no_grad():
            return model(held_out, labels=held_out).loss.item()

    start_loss, start = eval_loss(), time.time()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        rows = torch.stack([train[o : o + seq + 1] for o in offsets.tolist()])
        loss = model(rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps:
            print(f"  {name} step {step:3d}  train loss {loss.item():.3f}", flush=True)
    end_loss = eval_loss()
    tokens_per_s = steps * batch * (seq + 1) / (time.time() - start)
    print(f"  {name}: held-out loss {start_loss:.3f} -> {end_loss:.3f} ({tokens_per_s:.0f} tokens/s)")
    if not end_loss < start_loss - 0.5:
        raise SystemExit(f"{name}: the loss did not fall ({start_loss:.3f} -> {end_loss:.3f})")

    directory = out / name
    model.save_pretrained(directory)
    reloaded = models.from_pretrained(directory).eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(held_out).logits, reloaded(held_out).logits)
    if not same:
        raise SystemExit(f"{name}: logits changed after save + load of {directory}")
    print(f"  {name}: saved to {directory} (Hugging Face format; reload gives identical logits)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "smoke")
    args = parser.parse_args(argv)
    tokens = stdlib_bytes()
    print(f"smoke check: {len(tokens):,} byte tokens from {sysconfig.get_paths()['stdlib']}")
    import warnings

    warnings.filterwarnings("ignore", message="exporting a Doge MoE")
    for name in PRESETS:
        train_preset(name, tokens, args.steps, args.out)
    print("smoke check passed")


if __name__ == "__main__":
    main()
