"""Upcycling: turn a dense Doge checkpoint into a CDMoE one that keeps training.

    python -m train.upcycle SRC DST --num-experts 1024 --experts-per-token 16

SRC is a dense Doge model directory: a checkpoint of ours (`<run>/checkpoints/step-N/`) or any
Hugging Face Doge directory in transformers' layout (a hub id works too). DST becomes a Hugging Face
directory of the CDMoE model (`is_moe: true`), loadable by our models and by transformers.

Every dense weight is copied; the dense MLP becomes the CDMoE's shared expert (same key names). New:
`router_gate` (2K, d) ~ N(0, std), `down_embed` (E, d) ~ N(0, std), and `up_embed` (E, d) = 0, so
the upcycled model computes exactly the dense model's function at step 0 (checked on a probe batch;
the largest logit difference is printed). `--init random` draws `up_embed` ~ N(0, std) as well, as the
reference recipe does; the check then reports the difference instead of requiring zero.

When SRC is one of our full checkpoints, DST is one too: the AdamW moments of every copied parameter
(zeros for the new ones), the step (so the WSD schedule continues at its stable learning rate, with no
re-warmup), the data loader and RNG states. Continue with `trainer.resume=DST` (full state) or
`model.init_from=DST` (weights only, fresh optimizer); `optim.new_params_only_steps=N` trains only the
new expert parameters for the first N steps after the switch.

Nothing is written to DST unless the whole conversion succeeds (it is built under a temporary name
and renamed into place).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

import models
from models import CheckpointError, DogeConfig
from models.checkpoint import read_config_json, resolve_model_dir

from . import checkpoint as ckpt
from .engines import optimizer_state

logger = logging.getLogger("upcycle")


class UpcycleError(ValueError):
    pass


def upcycled_config(dense: DogeConfig, num_experts: int, top_k: int, router_layout: str) -> DogeConfig:
    if dense.is_moe:
        raise UpcycleError("the source model is already a mixture of experts (is_moe: true); upcycle a dense Doge")
    if num_experts < 1:
        raise UpcycleError(f"--num-experts {num_experts} must be a positive perfect square (K = sqrt(E) sub-keys), "
                           f"e.g. 16, 64, 1024")
    keys = math.isqrt(num_experts)
    if keys * keys != num_experts:
        raise UpcycleError(
            f"--num-experts {num_experts} must be a perfect square (product-key routing uses K = sqrt(E) sub-keys); "
            f"e.g. {keys * keys} or {(keys + 1) ** 2}"
        )
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"--experts-per-token {top_k} must be between 1 and --num-experts ({num_experts})")
    return dense.replace(is_moe=True, num_experts=num_experts, num_experts_per_tok=top_k, router_layout=router_layout)


@torch.no_grad()
def upcycle_model(dense: models.CausalLM, config: DogeConfig, init: str, std: float | None, seed: int):
    """The CDMoE model with every dense weight copied and the new ones initialised."""
    torch.manual_seed(seed)
    moe = models.DogeForCausalLM.build(config, dtype=next(dense.parameters()).dtype)
    dense_state = dense.state_dict()
    new = []
    for name, tensor in moe.state_dict().items():
        if name in dense_state:
            tensor.copy_(dense_state[name])
        else:
            new.append(name)
    std = std if std is not None else config.initializer_range
    for layer in moe.model.layers.values():
        layer.mlp.router_gate.weight.normal_(0.0, std)
        layer.mlp.down_embed.weight.normal_(0.0, std)
        if init == "zero":
            layer.mlp.up_embed.weight.zero_()
        else:
            layer.mlp.up_embed.weight.normal_(0.0, std)
    return moe, new


@torch.no_grad()
def probe_difference(dense, moe, vocab_size: int, seq_len: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=g)
    dense.eval(), moe.eval()
    return (dense(ids).logits.float() - moe(ids).logits.float()).abs().max().item()


def _is_training_checkpoint(directory: Path) -> bool:
    return (directory / "trainer_state" / "state.json").is_file()


def _convert_trainer_state(src: Path, tmp: Path, moe) -> bool:
    """Copy the training state; returns whether optimizer state came along."""
    (tmp / "trainer_state").mkdir(parents=True)
    state = json.loads((src / "trainer_state" / "state.json").read_text())
    for rank_file in (src / "trainer_state").glob("rank-*.pt"):
        shutil.copy2(rank_file, tmp / "trainer_state" / rank_file.name)
    carried = optimizer_state.has_state(src / "trainer_state")
    if carried:
        try:
            saved = optimizer_state.SavedState(src / "trainer_state")
        except RuntimeError as exc:
            raise UpcycleError(str(exc)) from None
        moe_names = {name for name, _ in moe.named_parameters()}
        missing = sorted(saved.names() - moe_names)
        if missing:
            raise UpcycleError(f"optimizer state for parameters the upcycled model lacks: {missing[:5]}")
        # copied as is: the new expert parameters are absent, and the trainer gives them zero moments at
        # the saved step when it loads the state
        for name in (optimizer_state.DIRECTORY, optimizer_state.LEGACY_FILE):
            source = src / "trainer_state" / name
            if source.is_dir():
                shutil.copytree(source, tmp / "trainer_state" / name)
            elif source.is_file():
                shutil.copy2(source, tmp / "trainer_state" / name)
    else:
        logger.warning("%s has no optimizer state of ours (a DeepSpeed checkpoint?): DST carries step, schedule and "
                       "data position; the optimizer starts fresh", src)
    state.update(
        upcycled_at=state["step"], upcycled_from=str(src.resolve()), optimizer_state=carried,
        run_id=uuid.uuid4().hex[:12],
    )
    (tmp / "trainer_state" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    return carried


def upcycle(src, dst, num_experts: int, top_k: int, init: str = "zero", std: float | None = None,
            router_layout: str = "per_token", aux_loss_coef: float | None = None, overwrite: bool = False,
            seed: int = 0, probe_len: int = 64, weights_only: bool = False) -> dict:
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise UpcycleError(f"{dst} exists and is not empty; choose another DST or pass --overwrite")
    src_dir = resolve_model_dir(src)
    values = read_config_json(src_dir)
    if values.get("model_type") != "doge":
        raise UpcycleError(f"{src_dir / 'config.json'}: model_type {values.get('model_type')!r}; upcycling needs a Doge model")
    if _is_training_checkpoint(src_dir):
        ckpt.verify(src_dir)  # a corrupt training checkpoint is refused, not half-converted
    dense = models.from_pretrained(src_dir)
    config = upcycled_config(dense.config, num_experts, top_k, router_layout)
    if aux_loss_coef is not None:
        config = config.replace(router_aux_loss_coef=aux_loss_coef)
    moe, new = upcycle_model(dense, config, init, std, seed)
    difference = probe_difference(dense, moe, config.vocab_size, min(probe_len, config.max_position_embeddings))
    if init == "zero" and difference != 0.0:
        raise UpcycleError(f"the zero-initialised upcycled model differs from the dense one by {difference:g}; refusing")

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the per_token export warning: said in the summary below
            moe.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "vocab.json", "merges.txt", "generation_config.json"):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp / name)
        carried = False
        training = _is_training_checkpoint(src_dir) and not weights_only
        if training:
            carried = _convert_trainer_state(src_dir, tmp, moe)
            ckpt.write_manifest(tmp, checksums=True)
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dst": dst, "new_parameters": new, "max_logit_difference": difference, "training_state": training,
            "optimizer_state": carried, "config": config}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.upcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="dense Doge directory: a checkpoint of ours, a transformers directory or a hub id")
    parser.add_argument("dst", help="the CDMoE directory to write")
    parser.add_argument("--num-experts", type=int, required=True, help="E, a perfect square (K = sqrt(E) sub-keys)")
    parser.add_argument("--experts-per-token", type=int, required=True, help="k, 1 <= k <= E")
    parser.add_argument("--init", choices=["zero", "random"], default="zero",
                        help="zero: up_embed = 0, the dense function exactly (default); random: N(0, std), as the reference")
    parser.add_argument("--init-std", type=float, default=None, help="std of the new weights (default: initializer_range)")
    parser.add_argument("--router-layout", choices=["per_token", "transformers"], default="per_token")
    parser.add_argument("--aux-loss-coef", type=float, default=None)
    parser.add_argument("--weights-only", action="store_true", help="write the model only, no training state")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = upcycle(args.src, args.dst, args.num_experts, args.experts_per_token, args.init, args.init_std,
                         args.router_layout, args.aux_loss_coef, args.overwrite, args.seed,
                         weights_only=args.weights_only)
    except (UpcycleError, CheckpointError, ckpt.CheckpointCorrupt, models.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = result["config"]
    print(f"upcycled {args.src} -> {result['dst']}: {c.num_experts} experts ({math.isqrt(c.num_experts)}^2 product "
          f"keys), {c.num_experts_per_tok} per token, router_layout={c.router_layout}")
    print(f"new parameters: {len(result['new_parameters'])} tensors (router_gate, down_embed, up_embed per layer)")
    print(f"probe batch: largest logit difference, dense vs upcycled = {result['max_logit_difference']:.3g}"
          + (" (function-preserving)" if args.init == "zero" else ""))
    if result["training_state"]:
        print("training state carried: step, schedule position, data loader, RNG"
              + (", AdamW moments (zeros for the new parameters)" if result["optimizer_state"] else "")
              + f". Continue with trainer.resume={result['dst']}")
    else:
        print(f"weights only. Continue with +model.init_from={result['dst']}")
    if c.router_layout == "per_token":
        print("note: router_layout=per_token (causal routing); transformers computes MoE routing with its own layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
