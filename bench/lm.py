"""Small byte-level language models and their training data, for the quality benchmark.

Three families: a **post-LN** transformer (normalise after each residual addition, as in the
original Transformer), the architecture known to need warmup -- without it, large early Adam steps
blow up the residual stream; a **pre-LN** transformer (normalise before each sub-layer, as GPT-2
and most current LLMs), which tolerates more; and an **LSTM**. The text is the Python standard
library's own source, present on every machine with Python, so nothing is downloaded; whole
files are held out for validation. The top-level modules are the pre-training text; a set of
packages (asyncio, email, json, http, urllib, xml, ...) is the fine-tuning text.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

VOCAB = 256


@dataclass(frozen=True)
class Corpus:
    train: Tensor
    validation: Tensor
    description: str

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training bytes' distribution: a model that learned nothing but
        byte frequencies reaches this loss, so a final loss at or above it is a collapse."""
        counts = torch.bincount(self.train.long(), minlength=VOCAB).double()
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * probs.log()).sum())


# The fine-tuning text: packages of the standard library, not its top-level modules.
FINE_TUNING_PACKAGES = ("asyncio", "email", "http", "json", "logging", "urllib", "xml", "xmlrpc")


def _split(files: list[Path], max_bytes: int, validation_every: int, what: str) -> Corpus:
    """The bytes of ``files`` in order, up to ``max_bytes``; every ``validation_every``-th file
    goes to the validation split."""
    train, validation, total = [], [], 0
    for index, path in enumerate(files):
        data = path.read_bytes()
        (validation if index % validation_every == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    description = f"{index + 1} files of {what} ({total} bytes)"
    return Corpus(as_tensor(train), as_tensor(validation), description)


def stdlib_corpus(max_bytes: int = 2_000_000, validation_every: int = 10) -> Corpus:
    """The standard library's top-level modules, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _split(sorted(root.glob("*.py")), max_bytes, validation_every, str(root))


def fine_tuning_corpus(max_bytes: int = 1_000_000, validation_every: int = 10) -> Corpus:
    """The modules of :data:`FINE_TUNING_PACKAGES`, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for package in FINE_TUNING_PACKAGES for p in (root / package).rglob("*.py"))
    where = f"{root}/{{{','.join(FINE_TUNING_PACKAGES)}}}"
    return _split(files, max_bytes, validation_every, where)


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    context: int = 64


class Block(nn.Module):
    """A transformer block; ``pre_norm`` normalises before each sub-layer (pre-LN), otherwise
    after each residual addition (post-LN)."""

    def __init__(self, config: ModelConfig, pre_norm: bool) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.pre_norm = pre_norm
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
        )
        self.norm2 = nn.LayerNorm(config.d_model)

    def attend(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self.attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attend(x))
        return self.norm2(x + self.mlp(x))


class Transformer(nn.Module):
    """A byte-level transformer LM, post-LN or (``pre_norm``) pre-LN with a final norm."""

    def __init__(self, config: ModelConfig, pre_norm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.position = nn.Parameter(torch.randn(config.context, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config, pre_norm) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model) if pre_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.embed.embedding_dim) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


class LSTMLanguageModel(nn.Module):
    """A byte-level LSTM LM: one layer of width ``d_model``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.lstm = nn.LSTM(config.d_model, config.d_model, batch_first=True)
        self.head = nn.Linear(config.d_model, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


ARCHITECTURES = ("post-LN", "pre-LN", "LSTM")


def make_model(architecture: str, config: ModelConfig) -> nn.Module:
    if architecture == "LSTM":
        return LSTMLanguageModel(config)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Invalid architecture: {architecture!r}, expected one of {ARCHITECTURES}")
    return Transformer(config, pre_norm=architecture == "pre-LN")


def batches(data: Tensor, context: int, batch_size: int, count: int, seed: int) -> Tensor:
    """``count`` batches of ``batch_size`` windows of ``context + 1`` bytes, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - context - 1, (count, batch_size), generator=generator)
    offsets = torch.arange(context + 1)
    return data[starts[..., None] + offsets].long()


def loss_on(model: nn.Module, windows: Tensor) -> Tensor:
    """Next-byte cross-entropy. Low-precision parameters are used through fp32 copies (bf16
    storage, fp32 compute), so only the optimizer's storage precision differs between runs; the
    gradients flow back to the stored parameters in their dtype."""
    tokens = windows[:, :-1]
    if next(model.parameters()).dtype == torch.float32:
        logits = model(tokens)
    else:
        upcast = {name: p.float() for name, p in model.named_parameters()}
        logits = torch.func.functional_call(model, upcast, (tokens,))
    return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
