"""Per-input-channel second moments of every linear's input, gathered block by block.

As GPTQ does: the model is built on the meta device, the inputs of block 0 are captured,
then each block is loaded alone from the checkpoint, run over the captured inputs with hooks
on its linears, and its outputs become the next block's inputs. Peak memory is one block's
weights plus the calibration activations, never the whole model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from meswitch.checkpoints import Checkpoint, CheckpointError, config_dtype
from meswitch.compression.config import CalibConfig
from meswitch.data.loading import DataSource, load_texts
from meswitch.devices import resolve_device
from meswitch.processes import check_stop

log = logging.getLogger(__name__)

LM_HEAD = "lm_head"


def read_texts(source: DataSource | Path | str) -> list[str]:
    """Calibration texts: the ``text`` field of a data set (a .jsonl file, a .txt file with a text per line, a
    dataset folder or id; see meswitch.data.loading, the one reader)."""
    return load_texts(source)


def token_chunks(tokenizer, texts: Sequence[str], cfg: CalibConfig) -> torch.Tensor:
    """Concatenate the texts (eos between them) and cut ``cfg.samples`` chunks of ``cfg.seq_len`` tokens.

    No padding, so every position is real text and contributes to the statistics.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= cfg.samples * cfg.seq_len:
            break
    n = min(cfg.samples, len(ids) // cfg.seq_len)
    if n == 0:
        raise ValueError(f"calibration texts hold {len(ids)} tokens, fewer than one sequence of {cfg.seq_len}")
    if n < cfg.samples:
        log.warning(
            "calibration texts give %d sequences of %d tokens, fewer than the %d asked for", n, cfg.seq_len, cfg.samples
        )
    return torch.tensor(ids[: n * cfg.seq_len]).view(n, cfg.seq_len)


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        self.kwargs = kwargs
        raise _Captured


def skeleton(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device with only embeddings, final norm, lm_head and rotary tables real."""
    config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = ckpt.spec
    inner = model.get_decoder()
    _materialize(inner.embed_tokens, {"weight": ckpt.get(spec.embed)}, device, dtype)
    _materialize(inner.norm, {"weight": ckpt.get(spec.final_norm)}, device, dtype)
    head = ckpt.get(spec.embed if ckpt.tied_embeddings else spec.lm_head)
    _materialize(model.lm_head, {"weight": head}, device, dtype)
    if hasattr(inner, "rotary_emb"):
        inner.rotary_emb = type(inner.rotary_emb)(config).to(device)
    return model


def _materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device, dtype) -> None:
    module.to_empty(device=device)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)


def calibrate(
    expert: Checkpoint,
    texts: Sequence[str],
    cfg: CalibConfig | None = None,
    device: str | torch.device = "auto",
) -> dict[str, torch.Tensor]:
    """``{module name: s}`` with ``s_i = Σ_t x_{t,i}²`` over the calibration tokens, for every linear.

    Keys are the full module names (``model.layers.3.mlp.down_proj``) plus ``lm_head``;
    values are fp32 on the CPU. With ``cfg.hessian`` each value is the full ``Σ_t x_t x_tᵀ`` [K, K]
    instead, whose diagonal is ``s`` (:func:`diagonal`). Runs on the GPU when one is present.
    """
    cfg = cfg or CalibConfig()
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = torch.float32 if device.type == "cpu" else config_dtype(expert.config)
    tokenizer = AutoTokenizer.from_pretrained(expert.path)
    ids = token_chunks(tokenizer, texts, cfg)
    spec = expert.spec
    model = skeleton(expert, device, dtype)
    inner = model.get_decoder()
    layers = inner.layers

    catcher = _Catcher()
    first = layers[0]
    layers[0] = catcher
    with torch.no_grad():
        for batch in ids.split(cfg.batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=batch.to(device), use_cache=False)
    layers[0] = first
    hidden, kwargs = catcher.inputs, catcher.kwargs

    stats: dict[str, torch.Tensor] = {}
    for i in tqdm(range(expert.num_layers), desc=f"calibrate {expert.path.name}", unit="block"):
        check_stop()
        block = layers[i]
        _materialize(block, expert.block_tensors(i), device, dtype)
        hooks = []
        for rel in spec.linears:
            name = f"{spec.block_prefix(i)}{rel}"
            k = block.get_submodule(rel).in_features
            stats[name] = torch.zeros((k, k) if cfg.hessian else (k,), dtype=torch.float32, device=device)
            hook = _accumulate(stats[name], cfg.skip_first)
            hooks.append(block.get_submodule(rel).register_forward_pre_hook(hook))
        with torch.no_grad():
            outs = []
            for h in hidden:
                out = block(h, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        for hook in hooks:
            hook.remove()
        for rel in spec.linears:  # the Hessians of a large model do not fit the GPU beside it
            stats[f"{spec.block_prefix(i)}{rel}"] = stats[f"{spec.block_prefix(i)}{rel}"].cpu()
        hidden = outs
        block.to_empty(device="meta")  # drop this block's weights before loading the next

    k = model.lm_head.in_features
    s = torch.zeros((k, k) if cfg.hessian else (k,), dtype=torch.float32, device=device)
    add = _accumulate(s, cfg.skip_first)
    with torch.no_grad():
        for h in hidden:
            add(None, (inner.norm(h),))
    stats[LM_HEAD] = s
    for name, v in stats.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{expert.path}: calibration produced non-finite activations at {name}")
    return {k: v.cpu() for k, v in stats.items()}


def diagonal(stat: torch.Tensor) -> torch.Tensor:
    """The per-channel second moments ``s`` [K] of a statistic, whether ``s`` itself or a Hessian [K, K]."""
    return torch.diagonal(stat) if stat.dim() == 2 else stat


def _accumulate(acc: torch.Tensor, skip_first: int = 0):
    """A forward pre-hook adding its input's second moments (``acc`` [K]) or Hessian (``acc`` [K, K])."""

    def hook(_module, args):
        x = args[0][:, skip_first:].float()  # [batch, seq, features]
        if acc.dim() == 2:
            x = x.reshape(-1, x.shape[-1])
            acc.addmm_(x.T, x)
        else:
            acc.add_((x * x).sum(dim=(0, 1)))

    return hook
