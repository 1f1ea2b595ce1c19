"""A web page for the sentiment model: paste a movie review, press "Classify", read the verdict.

    python examples/sentiment/web.py --model runs/sentiment                  # the edge site: on this CPU
    gpupool run -n 1 -p 0.25 -- python examples/sentiment/web.py --device gpupool --model runs/sentiment

Pages and API (Flask; the server is Werkzeug's threaded one, enough for an example - put a WSGI server such as
gunicorn in front for more):
  GET  /               the page: a text box, "Classify", the verdict with its probability, the model and device
  POST /               the page's form (works without JavaScript)
  POST /api/classify   JSON {"text": "..."} or {"texts": ["...", ...]} -> {"results": [{"label", "p_pos"}], ...}
  GET  /healthz        {"ok": true, "model": ..., "device": ...}
Requests that arrive together are classified in one batch (``Batcher``). Empty, non-UTF-8 and malformed input
get 400 with a clear message, a body over --max-bytes gets 413.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import threading
import urllib.parse
from concurrent.futures import Future
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import make_server

if __package__ in (None, ""):  # run as a script: make `examples.sentiment` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment import checkpoint
from examples.sentiment.infer import Classifier, Prediction
from examples.sentiment.runtime import DEVICES, resolve_device, setup_logging

log = logging.getLogger("sentiment.web")

MAX_BYTES = 64 * 1024  # a long review is ~10 KB; anything past this is refused with 413
MAX_TEXTS = 64  # texts in one API call


class BadInput(ValueError):
    """Client input the service refuses (HTTP 400), with the message to show."""


class Batcher:
    """Classifies texts from many request threads in shared batches: a worker thread takes whatever has queued
    up (at most max_batch texts, waiting up to window_s for more after the first) and runs one forward pass."""

    def __init__(self, classifier: Classifier, max_batch: int = 64, window_s: float = 0.01) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches: list[int] = []  # sizes of the batches run so far (for tests and logs)
        self._queue: Queue[tuple[str, Future[Prediction]]] = Queue()
        self._thread = threading.Thread(target=self._run, name="sentiment-batcher", daemon=True)
        self._thread.start()

    def classify(self, texts: list[str], timeout: float = 60.0) -> list[Prediction]:
        futures: list[Future[Prediction]] = []
        for text in texts:
            fut: Future[Prediction] = Future()
            self._queue.put((text, fut))
            futures.append(fut)
        return [f.result(timeout=timeout) for f in futures]

    def _run(self) -> None:
        while True:
            pending = [self._queue.get()]
            try:
                while len(pending) < self.max_batch:
                    pending.append(self._queue.get(timeout=self.window_s))
            except Empty:
                pass
            try:
                preds = self.classifier.predict([text for text, _ in pending])
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, never the worker
                log.exception("batch of %d failed", len(pending))
                for _, fut in pending:
                    fut.set_exception(exc)
                continue
            self.batches.append(len(pending))
            for (_, fut), pred in zip(pending, preds, strict=True):
                fut.set_result(pred)


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise BadInput("the review must be a string")
    if not text.strip():
        raise BadInput("the review is empty: type or paste some text")
    return text


def _form_text(raw: bytes) -> str:
    """The "text" field of an urlencoded form, decoded strictly (Werkzeug would replace invalid UTF-8 silently)."""
    try:
        fields = urllib.parse.parse_qs(raw.decode("utf-8"), encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise BadInput("the review is not valid UTF-8 text") from exc
    return _check_text((fields.get("text") or [""])[0])


def _json_texts(raw: bytes) -> list[str]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInput("the request body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise BadInput(f"the request body is not JSON: {exc}") from exc
    if isinstance(body, dict) and "text" in body:
        return [_check_text(body["text"])]
    if isinstance(body, dict) and isinstance(body.get("texts"), list) and 0 < len(body["texts"]) <= MAX_TEXTS:
        return [_check_text(t) for t in body["texts"]]
    raise BadInput(f'expected {{"text": "..."}} or {{"texts": [...]}} with 1 to {MAX_TEXTS} texts')


def create_app(batcher: Batcher, model_name: str, device: str, max_bytes: int = MAX_BYTES) -> Flask:
    """The Flask app serving one model (model_name and device are shown on the page and in every answer)."""
    app = Flask("sentiment")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    about = {"model": model_name, "device": device}

    def page(text: str = "", verdict: Prediction | None = None, error: str = "", status: int = 200) -> Response:
        return Response(render_page(text, verdict, error, model_name, device, max_bytes), status=status,
                        mimetype="text/html")  # fmt: skip

    @app.get("/")
    def index() -> Response:
        return page()

    @app.post("/")
    def classify_form() -> Response:
        raw = request.get_data(cache=False)
        try:
            text = _form_text(raw)
        except BadInput as exc:
            return page(error=str(exc), status=400)
        return page(text, batcher.classify([text])[0])

    @app.post("/api/classify")
    def classify_api() -> Response:
        try:
            texts = _json_texts(request.get_data(cache=False))
        except BadInput as exc:
            return Response(json.dumps({"error": str(exc)}), status=400, mimetype="application/json")
        results = [{"label": p.label, "p_pos": round(p.p_pos, 6)} for p in batcher.classify(texts)]
        return Response(json.dumps({"results": results, **about}), mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(json.dumps({"ok": True, **about}), mimetype="application/json")

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: HTTPException) -> Response:
        msg = f"the review is too long: at most {max_bytes:,} bytes"
        if request.path.startswith("/api/"):
            return Response(json.dumps({"error": msg}), status=413, mimetype="application/json")
        return page(error=msg, status=413)

    return app


def render_page(text: str, verdict: Prediction | None, error: str, model: str, device: str, max_bytes: int) -> str:
    esc = html.escape
    result = ""
    if verdict is not None:
        positive = verdict.label == "pos"
        p = verdict.p_pos if positive else 1.0 - verdict.p_pos
        word = "Positive" if positive else "Negative"
        attrs = f'id="verdict" class="{verdict.label}" data-label="{verdict.label}" data-p-pos="{verdict.p_pos:.6f}"'
        result = f"<p {attrs}><strong>{word}</strong> ({100 * p:.1f}% sure)</p>"
    if error:
        result = f'<p id="error" class="error">{esc(error)}</p>'
    return PAGE.format(text=esc(text), result=result, model=esc(model), device=esc(device), max_bytes=max_bytes)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gpupool sentiment</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
textarea {{ width: 100%; height: 10rem; font: inherit; }}
button {{ font-size: 1.1rem; padding: .4rem 1.4rem; margin-top: .5rem; }}
#verdict {{ font-size: 1.4rem; }} .pos {{ color: #1a7f37; }} .neg {{ color: #c62828; }} .error {{ color: #b26a00; }}
footer {{ margin-top: 2rem; color: #666; font-size: .9rem; }}
</style></head>
<body>
<h1>Is this movie review positive or negative?</h1>
<form method="post" action="/" accept-charset="utf-8">
<textarea id="text" name="text" maxlength="{max_bytes}" placeholder="Paste a movie review...">{text}</textarea>
<button id="classify" type="submit">Classify</button>
</form>
{result}
<footer id="about">Model <code>{model}</code> on device <code>{device}</code>.
JSON API: <code>POST /api/classify {{"text": "..."}}</code>.</footer>
</body></html>
"""


def describe(model_dir: Path) -> str:
    """A one-line name for the checkpoint: its folder, size and (when recorded) its test accuracy: that of the last
    epoch, whose weights train.py saved (not the best epoch's: a run past its best saves later, worse weights)."""
    meta = json.loads((model_dir / "config.json").read_text())
    cfg, results = meta["model"], meta.get("results", {})
    accs = [h["test_acc"] for h in results.get("history", []) if "test_acc" in h]
    best = f", {100 * accs[-1]:.1f}% test accuracy" if accs else ""
    regions = ",".join(str(k) for k in cfg.get("kernel_sizes", []))
    return f"{model_dir.name}: SentimentCNN ({cfg['vocab_size']:,} words, regions {regions}{best})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("runs/sentiment"), help="checkpoint directory from train.py")
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)} (default cpu: the edge site)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"largest request body (default {MAX_BYTES})")
    p.add_argument("--max-batch", type=int, default=64, help="most texts classified in one batch")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not (args.model / "model.pt").is_file():
        log.error("no trained model in %s (run examples/sentiment/train.py --out %s first)", args.model, args.model)
        return 2
    device = resolve_device(args.device)
    try:
        classifier = Classifier.load(args.model, device)
    except checkpoint.BadCheckpoint as exc:
        log.error("%s", exc)
        return 2
    batcher = Batcher(classifier, max_batch=args.max_batch)
    app = create_app(batcher, describe(args.model), str(device), args.max_bytes)
    server: Any = make_server(args.host, args.port, app, threaded=True)
    # One line a person or a test can read the address from (the port may have been 0).
    print(f"serving on http://{args.host}:{server.server_port}/ (model {args.model}, device {device})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
