"""Train the MLPerf sentiment CNN on aclImdb, locally or through gpupool.

    python examples/sentiment/train.py --device cpu|cuda|gpupool [--epochs 5] [--limit N] [--target 0.906]
    gpupool run -n 1 -p 0.5 -- python examples/sentiment/train.py --device gpupool --epochs 1 --limit 2000
    gpupool run -n 1 -p 0.5 -- python examples/sentiment/train.py --device gpupool --capture   # one command a step

Each epoch prints train loss/accuracy, test loss/accuracy (over the whole test split) and its time; training
stops once test accuracy reaches --target (MLPerf's 90.6%). The model is saved to --out (see checkpoint.py).
Loss and accuracy are accumulated on the device and read back only every --log-every steps and at the end of
an epoch, so a remote device is not synchronised on every step.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

if __package__ in (None, ""):  # run as a script: make `examples.sentiment` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment import checkpoint, data, fetch
from examples.sentiment.lazy import LazyAdam, SparseBatch
from examples.sentiment.model import BENCHMARK, BENCHMARK_VOCAB, SentimentCNN
from examples.sentiment.runtime import DEVICES, leased_memory, resolve_device, setup_logging, synchronize

log = logging.getLogger("sentiment.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)} (default cpu)")
    p.add_argument("--epochs", type=int, default=6, help="most epochs to train (default 6)")
    p.add_argument("--limit", type=int, default=0, help="use N train and N test reviews, balanced (0: all of them)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--lr-decay", choices=("none", "linear", "cosine"), default="none",
        help="learning-rate schedule over --epochs: none (constant), linear or cosine decay to 0 at the last step",
    )  # fmt: skip
    p.add_argument(
        "--embedding-update", choices=("lazy", "dense"), default="lazy",
        help="lazy (default): Adam on the embedding rows each batch reads (LazyAdam, lazy.py; under --capture those "
        "rows padded to one per token, a replayed step has fixed shapes); dense: torch's Adam over the whole tables",
    )  # fmt: skip
    p.add_argument(
        "--ema", type=float, default=0.998,
        help="evaluate and save an EMA of the weights (decay, default 0.998: about one epoch of aclImdb; 0: off)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--target", type=float, default=0.906, help="stop when test accuracy reaches this (default 0.906)")
    p.add_argument(
        "--data", default=None,
        help="aclImdb_v1.tar.gz, or 'sample' (the 5,000-review subset in the repository); default: $GPUPOOL_IMDB, "
        "the cache (~/.cache/gpupool), ../shared/data, else a download of the official tarball",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=data.default_cache_dir(), help="where the encoded data is cached")
    p.add_argument("--no-cache", action="store_true", help="tokenize the tarball every time")
    p.add_argument("--out", type=Path, default=Path("runs/sentiment"), help="checkpoint directory")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=BENCHMARK_VOCAB,
        help="most words kept (those seen at least twice in training, most frequent first)",
    )
    p.add_argument("--max-len", type=int, default=800, help="reviews are cut to this many tokens")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--filters", type=int, default=256)
    p.add_argument("--kernel-sizes", default="3", help="comma-separated odd region sizes (default 3)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument(
        "--bigram-buckets", type=int, default=BENCHMARK["bigram_buckets"], help="hashed bigram embeddings (0: off)"
    )
    p.add_argument(
        "--trigram-buckets", type=int, default=BENCHMARK.get("trigram_buckets", 0),
        help="hashed trigram embeddings (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--embed-dropout", type=float, default=BENCHMARK["embed_dropout"], help="dropout on the word vectors"
    )
    p.add_argument(
        "--embed-std", type=float, default=BENCHMARK["embed_std"], help="std of the embeddings' initial N(0, std)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=100, help="log the running train loss every N steps (0: off)")
    p.add_argument(
        "--capture",
        action="store_true",
        help="gpupool only: record the training step once per batch shape and replay it as one command per step "
        "(gpupool.torch.capture; Adam, LazyAdam and the --ema average then run with capturable=True and the lr on "
        "the device; each new batch shape records twice first, so a run of few steps is faster without it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


class WeightAverage:
    """An exponential moving average of the model's weights (Polyak averaging), evaluated and saved in place of
    the raw weights: it smooths the noise of the last steps, which on IMDB is worth a few tenths of a percent.

    `lazy_tables` (the embedding tables LazyAdam updates, whose rows change only in the steps that read them): their
    average moves only on those rows each step, and a row catches up on the steps it missed when it is next read or
    at `swap`: a row whose weight p stayed constant for k steps of decays d_i averages to p + (s - p) * prod(d_i),
    which is what k dense steps of lerp would have given (within float rounding). The dense average read and wrote
    every table every step: with 2^20 bigram buckets, ~0.4-0.6 s of a fake GPU's step (round 49).

    `capturable` (train.py --capture): the update count, the warm-up's decay and its log live on the weights' device
    and are computed there each step, as `Adam(capturable=True)` keeps its step count: a replayed step bakes in no
    Python number, so the warm-up runs under capture too. (Until round 50 --capture turned the warm-up off: after
    aclImdb's first epoch of 500 steps its average still held 0.998^500 = 37 % of the random initial weights, and
    tested at 82.1 % where eager's tested at 87.7 %.)"""

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float,
        warmup: bool = True,
        lazy_tables: list[torch.Tensor] | None = None,
        capturable: bool = False,
    ) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        # capturable: the update count on the device (float64: the warm-up's decay and its log are computed from it)
        self.count = torch.zeros((), dtype=torch.float64, device=self.params[0].device) if capturable else None
        lazy_ids = {id(t) for t in lazy_tables or []}
        self.lazy = {id(p): i for i, p in enumerate(self.params) if id(p) in lazy_ids}
        self.live = True  # the model holds the live weights (not swapped)
        self.row_log: dict[int, torch.Tensor] = {}
        if self.lazy:
            device = self.params[0].device
            # The sum of log(decay) over the updates so far, and for each row of a lazy table its value when the
            # row's average was last brought up to date (float64: a difference of two long sums).
            self.log_decay = torch.zeros((), dtype=torch.float64, device=device)
            for i in self.lazy.values():
                self.row_log[i] = torch.zeros(self.params[i].shape[0], dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, touched: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> None:
        """One step's update. `touched`: the (table, rows, their weights before this step's update) a lazy step read
        (SparseBatch.leaves, taken before LazyAdam.step clears them); required where there are lazy tables."""
        # Warm-up: early on the decay is (1 + n) / (10 + n), so the average does not drag the random initial
        # weights along for thousands of steps (it reaches 0.998 at n = 4,490: aclImdb's ninth epoch of 500 steps).
        self.updates += 1
        decay: float | torch.Tensor = self.decay
        log_decay: float | torch.Tensor = math.log(self.decay)
        weight: float | torch.Tensor = 1.0 - self.decay
        if self.warmup and self.count is not None:  # on the device: a replay computes it afresh
            self.count += 1
            decay = ((1.0 + self.count) / (10.0 + self.count)).clamp_(max=self.decay)
            log_decay = decay.log()
            decay = decay.to(self.shadow[0].dtype)
            weight = 1.0 - decay
        elif self.warmup:
            decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
            log_decay, weight = math.log(decay), 1.0 - decay
        for i, (s, p) in enumerate(zip(self.shadow, self.params, strict=True)):
            if i not in self.row_log:
                s.lerp_(p.detach(), weight)
        if not self.lazy:
            return
        if touched is None:
            raise ValueError("WeightAverage with lazy tables: update() needs the rows the step read")
        for table, rows, before in touched:
            i = self.lazy[id(table)]
            # the missed steps (the row's weight was `before` all along), then this one
            missed = torch.exp(self.log_decay - self.row_log[i].index_select(0, rows)).to(before.dtype).unsqueeze(1)
            s = torch.lerp(before.detach(), self.shadow[i].index_select(0, rows), missed)
            s.lerp_(table.detach().index_select(0, rows), weight)
            self.shadow[i].index_copy_(0, rows, s)
        self.log_decay += log_decay
        for table, rows, _ in touched:
            i = self.lazy[id(table)]
            self.row_log[i].index_copy_(0, rows, self.log_decay.expand(rows.shape[0]))

    @torch.no_grad()
    def catch_up(self) -> None:
        """Bring every row of the lazy tables' averages up to the last update (what `swap` does first)."""
        for i, row_log in self.row_log.items():
            p, s = self.params[i].detach(), self.shadow[i]
            missed = torch.exp(self.log_decay - row_log).to(s.dtype).unsqueeze(1)
            s.sub_(p).mul_(missed).add_(p)
            row_log.copy_(self.log_decay.expand_as(row_log))

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and the averaged weights (call twice to undo)."""
        if self.live and self.lazy:
            self.catch_up()
        for s, p in zip(self.shadow, self.params, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
        self.live = not self.live


StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (tokens, labels[, sparse]) -> (loss, logits)


def make_train_step(
    model: SentimentCNN,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None,
    capture: bool,
    lazy: LazyAdam | None = None,
) -> StepFn:
    """One optimizer step on a batch: (loss, logits), detached and still on the device (no sync here, so the
    whole step is one unit). With `lazy`, the batch's SparseBatch goes to the model and LazyAdam updates the
    embedding rows it read (the lr is the dense optimizer's, so a scheduler drives both). With `capture`,
    `gpupool.torch.capture` replays the step on the daemon as one command per step once it has been recorded for
    the batch's shape (with `lazy`: the SparseBatch of `model.sparse_batch(tokens, fixed=True)`, whose tensors
    become the captured step's arguments, and a `LazyAdam(capturable=True)`)."""

    def train_step(
        tokens: torch.Tensor, labels: torch.Tensor, sparse: SparseBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(tokens, sparse)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        touched = list(sparse.leaves) if sparse is not None else None  # the rows read, as they were
        if lazy is not None and sparse is not None:
            lr = optimizer.param_groups[0]["lr"]
            lazy.step(sparse, lr if isinstance(lr, torch.Tensor) else float(lr))
        if average is not None:
            average.update(touched if average.lazy else None)
        return loss.detach(), logits.detach()

    if not capture:
        return train_step
    import gpupool.torch  # only with --capture: the example runs without gpupool installed

    if lazy is None:
        return gpupool.torch.capture(train_step)  # type: ignore[no-any-return]
    tables = ["words"] + [n for n, t in (("bigrams", model.bigrams), ("trigrams", model.trigrams)) if t is not None]

    def lazy_train_step(
        tokens: torch.Tensor, labels: torch.Tensor, *rows_and_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step(tokens, labels, SparseBatch.of_tensors(tables, rows_and_index))

    # The SparseBatch travels as its tensors (capture binds tensor arguments); the model and the optimizer are not
    # in lazy_train_step's closure, so they are named for the guard.
    captured = gpupool.torch.capture(lazy_train_step, watch=[model, optimizer])

    def step(
        tokens: torch.Tensor, labels: torch.Tensor, sparse: SparseBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if sparse is None:
            raise ValueError("a captured lazy step needs the batch's SparseBatch")
        return captured(tokens, labels, *sparse.tensors())  # type: ignore[no-any-return]

    step.captured = captured  # type: ignore[attr-defined]  # its stats, for tests and benches
    return step


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step learning-rate schedule that reaches 0 after total_steps (None: constant rate)."""
    if kind == "none":
        return None
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


class StepsPerSecond(ProgressColumn):
    """The bar's speed in steps (batches) per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} steps/s" if speed else "- steps/s", style="progress.data.speed")


def training_bytes(model: torch.nn.Module, lazy_tables: set[int], ema: bool) -> dict[str, int]:
    """What training keeps on the device, by part (bytes): the weights, their average (--ema), Adam's two moments of
    each trained weight (LazyAdam's for the tables, torch's Adam's for the rest), and the gradients of those not in
    `lazy_tables` (ids: a lazily updated table's gradient is its batch's rows only). A batch's activations are not
    counted."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() * p.element_size() for p in trained)
    grads = sum(p.numel() * p.element_size() for p in trained if id(p) not in lazy_tables)
    return {"weights": weights, "their average": size if ema else 0, "Adam's moments": 2 * size, "gradients": grads}


def memory_too_small(
    parts: dict[str, int], leased: tuple[int, float] | None, failed: BaseException | None = None, bigrams: bool = False
) -> str:
    """The one line that says the lease's memory is too small for this training, with the numbers and the flags that
    fit (gpupool run -p / -m); "" where it fits (or the lease is not known). With `failed` (the device's own
    OutOfMemoryError, from a sync): its message, and advice past the lease's memory even where the estimate fit (then
    a batch's activations did not: a smaller batch too). `bigrams`: the model has a bigram table (a smaller model
    drops it)."""
    if leased is None:
        return ""
    quota, share = leased
    need = sum(parts.values())
    if failed is None and need <= quota:
        return ""
    from gpupool.client.run import more_memory

    def size(n: float) -> str:  # (two decimals: 2.03GiB needed of 2.00GiB must not read as 2.0 of 2.0)
        return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.1f}MiB" if n >= 2**20 else f"{n / 2**10:.0f}KiB"

    smaller = (
        "train with a smaller batch (--batch-size)" if failed is not None and need <= quota else "train a smaller model"
    )
    if bigrams and smaller.endswith("model"):
        smaller += " (--bigram-buckets 0: the hashed bigram table is most of its weights)"
    spelled = ", ".join(f"{size(n)} {what}" for what, n in parts.items() if n)
    of = f" ({share:g} of the GPU's {size(quota / share)})" if share > 0 else ""
    said = f"the device ran out of the lease's memory ({failed}); " if failed is not None else ""
    return (f"{said}training this model needs at least {size(need)} of the device's memory ({spelled}; a "
            f"batch's activations besides), and this lease grants {size(quota)}{of}: run it with gpupool run "
            f"{more_memory(max(need, quota + 1), quota, share)}, or {smaller}")  # fmt: skip


def run_epoch(
    model: SentimentCNN,
    split: data.Split,
    args: argparse.Namespace,
    device: torch.device,
    progress: Progress,
    step_fn: StepFn | None = None,
    rng: np.random.Generator | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    label: str = "",
    sync_first: bool = False,
) -> tuple[float, float]:
    """One pass over split (training when step_fn is given): (mean loss, accuracy). Its progress bar (named
    label) shows steps/s and, every --log-every steps, the running loss and accuracy. `sync_first`: wait for the
    first step's work on the device, so that its error (a remote device's memory quota) comes now, not at the first
    read-back (--log-every steps or the epoch's end later)."""
    training = step_fn is not None
    model.train(training)
    n_batches = -(-len(split) // args.batch_size)
    task = progress.add_task(label or ("train" if training else "test"), total=n_batches, running="")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = step = 0
    with torch.set_grad_enabled(training):
        for tokens, labels in data.batches(split, args.batch_size, args.max_len, rng=rng):
            rows = training and args.embedding_update == "lazy"
            sparse = model.sparse_batch(tokens, fixed=args.capture).to(device) if rows else None
            tokens, labels = tokens.to(device), labels.to(device)
            if step_fn is not None:
                loss, logits = step_fn(tokens, labels) if sparse is None else step_fn(tokens, labels, sparse)
                if scheduler is not None:
                    scheduler.step()
            else:
                logits = model(tokens).detach()
                loss = torch.nn.functional.cross_entropy(logits, labels)
            loss_sum += loss * labels.shape[0]
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += labels.shape[0]
            step += 1
            if sync_first and step == 1:
                synchronize(device)
            if args.log_every > 0 and step % args.log_every == 0:
                # One read-back every N steps: the running loss for the bar and the log, and it keeps an asynchronous
                # device from falling minutes behind the script (a long remote op queue delays everything else).
                running = f"loss {loss_sum.item() / seen:.4f} acc {correct.item() / seen:.4f}"
                progress.update(task, running=running)
                if training:
                    log.info("  step %d: train %s", step, running)
            progress.advance(task)
    return loss_sum.item() / len(split), correct.item() / len(split)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    # The device first: a pool lease's token is short-lived (gpupool run hands it over at start), and the first
    # tokenization of the tarball takes a minute or more; attaching first also fails fast when the pool is down.
    device = resolve_device(args.device)
    # Then the seed: the Python client's `gpupool` device exists only from `import gpupool.torch` (resolve_device) on,
    # and a torch.manual_seed before it would not reach the daemon's generator (dropout's masks would differ per run).
    torch.manual_seed(args.seed)
    try:
        tarball = fetch.locate(args.data)
    except fetch.DataNotFound as exc:
        log.error("%s", exc)
        return 2
    try:
        ds = data.load_dataset(tarball, None if args.no_cache else args.cache_dir, args.vocab_size)
    except data.BadTarball as exc:
        log.error("%s", exc)
        return 2
    train, test = ds.train, ds.test
    if args.limit > 0:
        train = data.balanced_subset(train, args.limit, rng)
        test = data.balanced_subset(test, args.limit, None)
    log.info("aclImdb: %d train / %d test reviews, vocabulary %d words", len(train), len(test), len(ds.vocab))

    kernel_sizes = tuple(int(k) for k in args.kernel_sizes.split(","))
    config = checkpoint.ModelConfig(
        vocab_size=len(ds.vocab),
        embed_dim=args.embed_dim,
        filters=args.filters,
        kernel_sizes=kernel_sizes,
        dropout=args.dropout,
        max_len=args.max_len,
        embed_std=args.embed_std,
        bigram_buckets=args.bigram_buckets,
        trigram_buckets=args.trigram_buckets,
        embed_dropout=args.embed_dropout,
    )
    model = config.build()
    if args.capture and device.type != "gpupool":
        log.error("--capture needs --device gpupool")
        return 2
    # A lease too small for this training is said now, with its numbers and the flags that fit: until round 49 the
    # quota's refusal came back at the first read-back (a short epoch later) as a traceback of raw byte counts.
    leased = leased_memory(device)
    parts = training_bytes(model, {id(p) for p in model.embedding_tables()} if args.embedding_update == "lazy"
                           else set(), args.ema > 0)  # fmt: skip
    too_small = memory_too_small(parts, leased, bigrams=args.bigram_buckets > 0)
    if too_small:
        log.error("%s", too_small)
        return 2
    model = model.to(device)
    # capturable=True keeps Adam's step count and bias corrections on the device, so a replayed step is exact.
    lr: float | torch.Tensor = torch.tensor(args.lr, device=device) if args.capture else args.lr
    lazy = LazyAdam(model.embedding_tables(), capturable=args.capture) if args.embedding_update == "lazy" else None
    tables = {id(p) for p in model.embedding_tables()} if lazy is not None else set()
    dense = [p for p in model.parameters() if id(p) not in tables]
    optimizer = torch.optim.Adam(dense, lr=lr, weight_decay=args.weight_decay, capturable=args.capture)
    average = None
    if args.ema > 0:
        still = model.embedding_tables() if lazy is not None else None  # rows LazyAdam leaves alone stay still
        average = WeightAverage(model, args.ema, lazy_tables=still, capturable=args.capture)
    train_step = make_train_step(model, optimizer, average, args.capture, lazy)
    scheduler = make_scheduler(optimizer, args.lr_decay, args.epochs * -(-len(train) // args.batch_size))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %d parameters, on %s", config, n_params, device)

    history: list[dict[str, float]] = []
    reached = False
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), StepsPerSecond(),
               TextColumn("{task.fields[running]}"), TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, disable=args.no_progress or not sys.stderr.isatty(), transient=False) as progress:
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            try:  # (the first step synced: a device that cannot hold it says so now)
                first = epoch == 1 and leased is not None
                train_loss, train_acc = run_epoch(
                    model, train, args, device, progress, train_step, rng, scheduler, f"epoch {epoch} train", first
                )
            except torch.OutOfMemoryError as exc:
                if leased is None:
                    raise
                log.error("%s", memory_too_small(parts, leased, exc, args.bigram_buckets > 0))
                return 2
            t1 = time.perf_counter()
            if average is not None:
                average.swap()  # evaluate the averaged weights
            test_loss, test_acc = run_epoch(model, test, args, device, progress, label=f"epoch {epoch} test ")
            t2 = time.perf_counter()
            history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                            "test_acc": test_acc, "train_s": t1 - t0, "test_s": t2 - t1})  # fmt: skip
            log.info(
                "epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | train %.1fs test %.1fs",
                epoch, train_loss, train_acc, test_loss, test_acc, t1 - t0, t2 - t1,
            )  # fmt: skip
            if test_acc >= args.target:
                reached = True  # the averaged weights stay in the model and are saved
                log.info("reached the target test accuracy %.4f >= %.4f after %d epochs", test_acc, args.target, epoch)
                break
            if average is not None and epoch < args.epochs:
                average.swap()  # back to the live weights for the next epoch
    if args.capture:  # (each graph after the first is logged at DEBUG level: a batch of new shapes records one)
        stats = getattr(train_step, "captured", train_step).stats
        log.info("captured step: %d graph(s) recorded, %d step(s) replayed (%d recorded, %d eager)",
                 stats["defined"], stats["replayed"], stats["recorded"], stats["eager"])  # fmt: skip
    if history and not reached:
        log.info(  # the demo's 3 epochs on the 5,000-review sample stop near 0.75: not a failure
            "test accuracy target %.4f (--target; MLPerf's, for the full data) not reached in %d epoch(s): best %.4f",
            args.target, len(history), max(h["test_acc"] for h in history),
        )  # fmt: skip
    results = {"device": str(device), "train_reviews": len(train), "test_reviews": len(test), "seed": args.seed,
               "reached_target": reached, "target": args.target, "history": history,
               "host": os.uname().nodename}  # fmt: skip
    checkpoint.save(args.out, model, config, ds.vocab, results)
    log.info("saved the model to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
