"""Saving and loading a trained sentiment model without pickle.

A checkpoint is a directory: ``model.pt`` (the state_dict, saved with torch.save and loaded with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers),
``vocab.json`` (the word list) and ``config.json`` (the model's hyper-parameters and training results).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from examples.sentiment.model import SentimentCNN


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embed_dim: int = 128
    filters: int = 256
    kernel_sizes: tuple[int, ...] = (3,)
    dropout: float = 0.5
    max_len: int = 800
    embed_std: float = 1.0
    bigram_buckets: int = 0
    embed_dropout: float = 0.0
    trigram_buckets: int = 0

    def build(self) -> SentimentCNN:
        return SentimentCNN(
            self.vocab_size,
            embed_dim=self.embed_dim,
            filters=self.filters,
            kernel_sizes=self.kernel_sizes,
            dropout=self.dropout,
            embed_std=self.embed_std,
            bigram_buckets=self.bigram_buckets,
            embed_dropout=self.embed_dropout,
            trigram_buckets=self.trigram_buckets,
        )


def save(out_dir: Path, model: torch.nn.Module, config: ModelConfig, vocab: list[str], results: dict[str, Any]) -> None:
    """Write model.pt, vocab.json and config.json into out_dir (tensors are copied to the CPU first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(state, out_dir / "model.pt")
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "config.json").write_text(json.dumps({"model": asdict(config), "results": results}, indent=2))


class BadCheckpoint(ValueError):
    """A folder that does not hold a loadable checkpoint of train.py; the message is one line naming what is wrong."""


class RefusedPickle(BadCheckpoint, pickle.UnpicklingError):
    """model.pt holds objects other than tensors and plain containers: torch.load(weights_only=True) refused it."""


def load(out_dir: Path, device: torch.device | str = "cpu") -> tuple[SentimentCNN, ModelConfig, list[str]]:
    """The model (in eval mode, on device), its config and vocabulary from a checkpoint directory.

    A folder without train.py's three files, with files of another shape, or a model.pt that does not match its
    config.json raises BadCheckpoint (one line); a model.pt with pickled objects raises RefusedPickle."""
    try:
        meta = json.loads((out_dir / "config.json").read_text())["model"]
        meta["kernel_sizes"] = tuple(meta["kernel_sizes"])
        config = ModelConfig(**meta)
        vocab = json.loads((out_dir / "vocab.json").read_text())
        model = config.build()
    except FileNotFoundError as exc:
        raise BadCheckpoint(
            f"{out_dir}: no {Path(str(exc.filename)).name} (a checkpoint is the --out folder of "
            "examples/sentiment/train.py: model.pt, vocab.json, config.json)"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise BadCheckpoint(
            f"{out_dir}: config.json or vocab.json is not train.py's ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(vocab, list) or len(vocab) != config.vocab_size:
        raise BadCheckpoint(f"{out_dir}/vocab.json does not match config.json (vocab_size {config.vocab_size})")
    try:
        state = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RefusedPickle(
            f"{out_dir}/model.pt holds objects other than tensors: refused (torch.load(weights_only=True))"
        ) from exc
    except FileNotFoundError as exc:
        raise BadCheckpoint(f"{out_dir}: no model.pt (a checkpoint is the --out folder of train.py)") from exc
    except (OSError, RuntimeError, EOFError) as exc:  # a truncated or damaged file: torch's zip reader says which
        raise BadCheckpoint(
            f"{out_dir}/model.pt cannot be read ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing/unexpected keys, other shapes, not a dict
        why = " ".join(str(exc).split())[:300]
        raise BadCheckpoint(f"{out_dir}/model.pt does not match its config.json ({why})") from exc
    return model.to(device).eval(), config, [str(w) for w in vocab]
