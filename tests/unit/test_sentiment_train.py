"""train.py and infer.py of the sentiment example on CPU, on a small synthetic aclImdb-shaped tarball:
training learns, stops at the target, saves a checkpoint that reloads without pickle, and serves predictions."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.sentiment import checkpoint, data, fake_data, infer, train

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--embed-dim", "16", "--filters", "16", "--bigram-buckets", "1000", "--lr", "0.01", "--batch-size", "8",
         "--lr-decay", "none", "--ema", "0", "--no-progress"]  # fmt: skip


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    return fake_data.write_tarball(tmp_path / "aclImdb_v1.tar.gz", per_class=40)


def _train(tmp_path: Path, tarball: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--data", str(tarball), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert train.main([*argv, *SMALL, *extra]) == 0
    return json.loads((out / "config.json").read_text())


def test_training_learns_saves_and_reloads(tmp_path: Path, tarball: Path) -> None:
    meta = _train(tmp_path, tarball, "--epochs", "8", "--target", "1.01")
    history = meta["results"]["history"]
    assert len(history) == 8 and meta["results"]["reached_target"] is False
    assert history[-1]["test_acc"] >= 0.9 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert meta["results"]["train_reviews"] == meta["results"]["test_reviews"] == 80

    model, config, vocab = checkpoint.load(tmp_path / "out")
    assert config.embed_dim == 16 and config.vocab_size == len(vocab) and not model.training
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert set(saved) == set(model.state_dict())

    clf = infer.Classifier(model, vocab, config.max_len, torch.device("cpu"))
    preds = clf.predict(["a great wonderful superb film , loved it", "awful boring dull , a waste", ""])
    assert [p.label for p in preds[:2]] == ["pos", "neg"]
    assert 0.0 <= preds[2].p_pos <= 1.0  # an empty text still gets an answer
    assert clf.predict([]) == []


def test_linear_decay_with_an_evaluated_weight_average_learns(tmp_path: Path, tarball: Path) -> None:
    # --lr-decay linear (to 0 over --epochs) with --ema (an EMA of the weights, evaluated and saved)
    schedule = ["--lr", "0.02", "--lr-decay", "linear", "--ema", "0.9"]
    meta = _train(tmp_path, tarball, "--epochs", "8", "--target", "1.01", *schedule)
    history = meta["results"]["history"]
    assert len(history) == 8 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] >= 0.8, history


def test_weight_average_warms_up_then_keeps_its_decay() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = train.WeightAverage(model, decay=0.98)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update()  # first update: decay (1 + 1) / (10 + 1), so the average moves 9/11 of the way
    assert average.shadow[0].item() == pytest.approx(9 / 11)
    for _ in range(500):
        average.update()
    assert average.shadow[0].item() == pytest.approx(1.0)
    assert min(0.98, (1 + 500) / (10 + 500)) == 0.98  # by then the plain decay applies
    average.swap()
    assert model.weight.item() == pytest.approx(1.0)


@pytest.mark.parametrize("fixed", [False, True])
def test_the_lazy_average_of_the_tables_is_the_dense_one(fixed: bool) -> None:
    """WeightAverage(lazy_tables=...) (round 49: the average of an embedding row moves only when a batch reads it and
    catches up on the steps it missed) gives the dense average's weights after every swap, with the warm-up's
    changing decay, rows read again after a pause, rows never read, and (fixed) the padded rows of --capture with its
    capturable average (round 50: the warm-up's count and decay as device tensors)."""
    from examples.sentiment.lazy import LazyAdam
    from examples.sentiment.model import SentimentCNN

    torch.manual_seed(0)
    model = SentimentCNN(40, embed_dim=4, filters=3, bigram_buckets=30, embed_std=0.1, dropout=0.0)
    dense_avg = train.WeightAverage(model, decay=0.9)
    lazy_avg = train.WeightAverage(model, decay=0.9, lazy_tables=model.embedding_tables(), capturable=fixed)
    tables = {id(p) for p in model.embedding_tables()}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], 0.05)
    lazy = LazyAdam(model.embedding_tables())
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        high = 40 if step % 4 == 3 else 12  # most steps read words 1-11 only: the others wait, then catch up
        x, y = torch.randint(0, high, (3, 6), generator=gen), torch.randint(0, 2, (3,), generator=gen)
        sparse = model.sparse_batch(x, fixed=fixed)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, sparse), y).backward()
        opt.step()
        touched = list(sparse.leaves)
        lazy.step(sparse, 0.05)
        dense_avg.update()
        lazy_avg.update(touched)
        if step in (5, 11):
            live = [p.detach().clone() for p in model.parameters()]
            lazy_avg.swap()  # the model now holds the (caught up) lazy average
            for a, b in zip(dense_avg.shadow, model.parameters(), strict=True):
                torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-7)
            lazy_avg.swap()  # back to the live weights
            assert all(torch.equal(a, b) for a, b in zip(live, model.parameters(), strict=True))
    assert not torch.equal(lazy_avg.shadow[0][20:], model.embedding.weight.detach()[20:])  # averages that moved
    with pytest.raises(ValueError, match="needs the rows"):
        lazy_avg.update()


def test_training_stops_at_the_target_and_limit_is_balanced(tmp_path: Path, tarball: Path) -> None:
    meta = _train(tmp_path, tarball, "--epochs", "5", "--target", "0.0", "--limit", "10")
    results = meta["results"]
    assert len(results["history"]) == 1 and results["reached_target"] is True
    assert results["train_reviews"] == results["test_reviews"] == 10


def test_checkpoint_refuses_pickled_objects(tmp_path: Path, tarball: Path) -> None:
    _train(tmp_path, tarball, "--epochs", "1", "--limit", "10")
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    torch.save({"state": state, "payload": Path("/etc/passwd")}, tmp_path / "out" / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load(tmp_path / "out")


def test_unknown_device_is_a_clear_error(tmp_path: Path, tarball: Path) -> None:
    with pytest.raises(SystemExit, match="unknown --device"):
        _train(tmp_path, tarball, "--device", "tpu", "--epochs", "1")


def test_scripts_run_as_commands(tmp_path: Path, tarball: Path) -> None:
    out = tmp_path / "out"
    data_args = ["--data", str(tarball), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    cmd = [sys.executable, str(REPO / "examples/sentiment/train.py"), "--device", "cpu", "--epochs", "2",
           "--limit", "40", *data_args, *SMALL]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "epoch 1: train loss" in done.stderr and "test loss" in done.stderr
    assert (out / "model.pt").is_file() and (out / "vocab.json").is_file()

    infer_py = str(REPO / "examples/sentiment/infer.py")
    done = subprocess.run([sys.executable, infer_py, "--model", str(out), "--json"],
                          input="great superb\n\nawful dull\n", capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["great superb", "awful dull"]
    assert all(r["label"] in ("pos", "neg") and 0.0 <= r["p_pos"] <= 1.0 for r in rows)

    done = subprocess.run([sys.executable, infer_py, "--model", str(tmp_path / "missing"), "x"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "no trained model" in done.stderr


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_saved_model_is_the_evaluated_one(tmp_path: Path, tarball: Path, ema: str) -> None:
    meta = _train(tmp_path, tarball, "--epochs", "2", "--target", "1.01", "--ema", ema)
    model, config, _ = checkpoint.load(tmp_path / "out")
    test = data.load_dataset(tarball, tmp_path / "cache").test
    correct = 0
    with torch.no_grad():
        for tokens, labels in data.batches(test, 8, config.max_len):
            correct += int((model(tokens).argmax(dim=1) == labels).sum())
    assert correct / len(test) == meta["results"]["history"][-1]["test_acc"]


@pytest.mark.parametrize("damage", ["truncated", "not a tar", "no reviews"])
def test_a_damaged_tarball_is_one_line_not_a_traceback(
    tmp_path: Path, tarball: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # --data pointing at a half-downloaded or wrong file: train.py stops with one line naming the file (exit 2)
    bad = tmp_path / "bad.tar.gz"
    if damage == "truncated":
        bad.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    elif damage == "not a tar":
        bad.write_text("<html>404 Not Found</html>\n")
    else:
        import tarfile

        with tarfile.open(bad, "w:gz"):
            pass
    argv = ["--device", "cpu", "--data", str(bad), "--no-cache", "--out", str(tmp_path / "out"), "--epochs", "1"]
    with caplog.at_level("ERROR", logger="sentiment.train"):
        assert train.main([*argv, *SMALL]) == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    msg = record.getMessage()
    assert str(bad) in msg and "\n" not in msg and "aclImdb" in msg
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_checkpoint_is_one_line_for_infer_and_web(
    tmp_path: Path, tarball: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the edge site pointed at the wrong folder, a half-copied one, or weights of another configuration: exit 2 with
    # one line naming the folder (infer.py and web.py), never a traceback; pickled objects stay refused
    from examples.sentiment import web

    _train(tmp_path, tarball, "--epochs", "1", "--limit", "10")
    good = tmp_path / "out"
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.pt").write_bytes((good / "model.pt").read_bytes())  # copied without config.json and vocab.json
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.pt", "vocab.json"):
        (other / name).write_bytes((good / name).read_bytes())
    meta = json.loads((good / "config.json").read_text())
    meta["model"]["filters"] = 32  # weights of 16 filters under a config of 32
    (other / "config.json").write_text(json.dumps(meta))
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("config.json", "vocab.json"):
        (cut / name).write_bytes((good / name).read_bytes())
    (cut / "model.pt").write_bytes((good / "model.pt").read_bytes()[:1000])  # an interrupted copy
    for folder, why in ((half, "no config.json"), (other, "does not match"), (cut, "cannot be read")):
        for script, logger in ((infer, "sentiment.infer"), (web, "sentiment.web")):
            caplog.clear()
            argv = ["--model", str(folder)] + (["some text"] if script is infer else ["--port", "0"])
            with caplog.at_level("ERROR", logger=logger):
                assert script.main(argv) == 2, (folder, script)
            (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
            msg = record.getMessage()
            assert str(folder) in msg and why in msg and "\n" not in msg, msg
    with pytest.raises(checkpoint.BadCheckpoint, match="no config.json"):
        checkpoint.load(half)


def test_infer_reads_windows_line_ends_as_text_without_carriage_returns(
    tmp_path: Path, tarball: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    _train(tmp_path, tarball, "--epochs", "1", "--limit", "10")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("great superb\r\n\r\nawful dull\r\n"))
    assert infer.main(["--model", str(tmp_path / "out"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great superb", "awful dull"]


def test_the_web_page_names_the_accuracy_of_the_saved_weights(tmp_path: Path) -> None:
    # train.py saves the last epoch's weights; a run past its best epoch (round 48's 91.12 % then 91.03 %) must not
    # be shown with the best epoch's accuracy
    from examples.sentiment import web

    history = [{"epoch": 1, "test_acc": 0.8771}, {"epoch": 2, "test_acc": 0.9112}, {"epoch": 3, "test_acc": 0.9103}]
    config = {"vocab_size": 49994, "kernel_sizes": [3]}
    (tmp_path / "config.json").write_text(json.dumps({"model": config, "results": {"history": history}}))
    assert web.describe(tmp_path) == f"{tmp_path.name}: SentimentCNN (49,994 words, regions 3, 91.0% test accuracy)"
