"""The review page (``sofar review --serve``): a day's review queue, one photo at a time, judged
with one click or one key.

A small Starlette app over the same warehouse as the CLI (DuckDB locally, BigQuery in
production): the queue is :func:`lib.review.page_queue` (the review queue, then the least
confident photos; photos with a verdict have left it),
a verdict goes through :func:`lib.review.record_verdict` (the validation and append of
``sofar correct``) into ``label_corrections`` with the inspector's name, and undo removes the
row the page just appended. The page has no login of its own: locally it binds 127.0.0.1; in
production it runs behind the cluster's identity-aware proxy, whose user header names the
inspector (``X-Goog-Authenticated-User-Email``).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sofar_assets.lib.data.dataset import IRRELEVANT
from sofar_assets.lib.review import queue as review
from sofar_assets.lib.review.corrections import CorrectionError

IAP_USER_HEADER = "x-goog-authenticated-user-email"  # "accounts.google.com:alice@example.com"
QUEUE_LIMIT = 200
PHOTO_PX = 900  # the longest side of a photo as the page shows it

PAGE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>review {{ day }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }
 header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1em; background: #fff;
          border-bottom: 1px solid #ddd; }
 header h1 { font-size: 1.1em; margin: 0; }
 main { display: flex; gap: 1.5em; padding: 1em; align-items: flex-start; }
 #photo { width: min(60vw, 80vh); height: min(60vw, 80vh); object-fit: contain; background: #ddd; }
 .facts { min-width: 22em; }
 .facts table { border-collapse: collapse; margin: .5em 0; }
 .facts td { padding: .15em .6em .15em 0; }
 #image-id { font-family: monospace; font-size: 1.2em; }
 .reason { display: inline-block; padding: .1em .5em; border-radius: .3em; background: #fde2e2; }
 button { font-size: 1em; margin: .2em; padding: .4em .8em; cursor: pointer; }
 kbd { background: #eee; border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; font-size: .85em; }
 #done { display: none; font-size: 1.3em; padding: 2em; }
 #note { color: #a15c00; min-height: 1.2em; }
</style></head>
<body>
<header>
  <h1>Review queue</h1>
  <form method="get" action="/"><input type="date" name="day" value="{{ day }}">
    <button type="submit">open day</button></form>
  <span><b id="left">{{ queue|length }}</b> left{% if judged %}, {{ judged }} judged before{% endif %}</span>
  <span>inspector <b id="inspector">{{ inspector }}</b></span>
  {% if stale %}<span class="reason">{{ stale }}</span>{% endif %}
</header>
<div id="done">Nothing left to review on {{ day }}.</div>
<main id="card">
  <img id="photo" alt="photo under review">
  <div class="facts">
    <div id="image-id"></div>
    <div><span class="reason" id="reason"></span></div>
    <table>
      <tr><td>top-1</td><td id="top1"></td></tr>
      <tr><td>top-2</td><td id="top2"></td></tr>
      <tr><td>label set</td><td id="label-set"></td></tr>
      <tr><td>OOD score</td><td id="ood"></td></tr>
    </table>
    <div id="buttons">
      {% for label in labels %}<button data-label="{{ label }}"><kbd>{{ loop.index }}</kbd> {{ label }}</button>
      {% endfor %}<button data-label="{{ irrelevant }}"><kbd>i</kbd> {{ irrelevant }}</button>
      <button id="skip"><kbd>s</kbd> skip</button>
      <button id="undo"><kbd>u</kbd> undo</button>
    </div>
    <p id="note"></p>
  </div>
</main>
<script>
const DAY = {{ day|tojson }};
const LABELS = {{ labels|tojson }};
let queue = {{ queue|tojson }};
const history = [];
function fmt(label, p) { return label == null ? "-" : label + " " + Number(p).toFixed(2); }
function show() {
  document.getElementById("left").textContent = queue.length;
  const empty = queue.length === 0;
  document.getElementById("card").style.display = empty ? "none" : "flex";
  document.getElementById("done").style.display = empty ? "block" : "none";
  if (empty) return;
  const r = queue[0];
  document.getElementById("photo").src = "/photo?day=" + DAY + "&image_id=" + encodeURIComponent(r.image_id);
  document.getElementById("image-id").textContent = r.image_id;
  document.getElementById("reason").textContent = r.reason;
  document.getElementById("top1").textContent = fmt(r.top1_label, r.top1_prob);
  document.getElementById("top2").textContent = fmt(r.top2_label, r.top2_prob);
  document.getElementById("label-set").textContent =
    r.label_set == null ? "-" : "{" + r.label_set.split("|").filter(x => x).join(", ") + "}";
  document.getElementById("ood").textContent = Number(r.ood_score).toFixed(2) + (r.is_ood ? " (OOD)" : "");
}
async function post(path, body) {
  const res = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}
let busy = false;
async function judge(label) {
  if (busy || queue.length === 0) return;
  busy = true;
  const r = queue[0];
  try {
    const got = await post("/verdict", {day: DAY, image_id: r.image_id, label: label});
    history.push({row: queue.shift(), corrected_at: got.corrected_at, stored: got.stored});
    document.getElementById("note").textContent = got.stored ? "" :
      r.image_id + ": this verdict was already stored (kept once)";
  } catch (e) { document.getElementById("note").textContent = e.message; }
  busy = false;
  show();
}
function skip() { if (queue.length > 1) { queue.push(queue.shift()); show(); } }
async function undo() {
  if (busy || history.length === 0) return;
  busy = true;
  const last = history.pop();
  try {
    if (last.stored) await post("/undo", {day: DAY, image_id: last.row.image_id, corrected_at: last.corrected_at});
    queue.unshift(last.row);
    document.getElementById("note").textContent = "undone: " + last.row.image_id;
  } catch (e) { history.push(last); document.getElementById("note").textContent = e.message; }
  busy = false;
  show();
}
document.getElementById("buttons").addEventListener("click", e => {
  const b = e.target.closest("button");
  if (!b) return;
  if (b.id === "skip") skip(); else if (b.id === "undo") undo(); else judge(b.dataset.label);
});
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= LABELS.length) judge(LABELS[n - 1]);
  else if (e.key === "i") judge({{ irrelevant|tojson }});
  else if (e.key === "s") skip();
  else if (e.key === "u" || e.key === "z") undo();
});
show();
</script>
</body></html>
""", autoescape=True)


def _clean(value):
    """A cell for JSON: NaN/NA -> None, numpy scalars -> Python."""
    if value is None:
        return None
    try:
        if value != value:  # NaN
            return None
    except (TypeError, ValueError):
        return None
    return value.item() if hasattr(value, "item") else value


def build_app(wh, table: str, vocabulary: list[str], read_bytes: Callable[[str], bytes], *, inspector: str,
              default_day: dt.date, behind_proxy: bool = False,
              stale_note: Callable[[dt.date], str] | None = None) -> Starlette:
    """The review page's app. ``read_bytes(uri)`` fetches a photo (``lib.storage.read_bytes``);
    ``stale_note(day)`` says when the day was scored by a version that is no longer champion."""

    def who(request: Request) -> str:
        header = request.headers.get(IAP_USER_HEADER, "") if behind_proxy else ""
        return header.split(":", 1)[-1] if header else inspector

    def day_of(text: str | None) -> dt.date:
        return default_day if not text else dt.date.fromisoformat(text)

    async def page(request: Request):
        try:
            day = day_of(request.query_params.get("day"))
        except ValueError:
            return HTMLResponse("day: write YYYY-MM-DD", status_code=400)
        queue = review.page_queue(wh, table, day, limit=QUEUE_LIMIT)
        rows = [{k: _clean(v) for k, v in r.items()} for r in queue.to_dict("records")]
        for r in rows:
            r.pop("image_uri", None)  # the browser fetches photos by image_id only
        html = PAGE.render(day=day.isoformat(), queue=rows, labels=list(vocabulary), irrelevant=IRRELEVANT,
                           inspector=who(request), judged=review.judged_in_queue(wh, table, day),
                           stale=stale_note(day) if stale_note else "")
        return HTMLResponse(html)

    async def photo(request: Request):
        try:
            day = day_of(request.query_params.get("day"))
        except ValueError:
            return Response("day: write YYYY-MM-DD", status_code=400)
        row = review.photo_row(wh, table, day, request.query_params.get("image_id", ""))
        if row is None:
            return Response("no such photo on that day", status_code=404)
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(read_bytes(str(row["image_uri"]))))
            img = img.convert("RGB")
            img.thumbnail((PHOTO_PX, PHOTO_PX))
        except Exception as exc:  # deleted or changed since it was scored: say so, the page goes on
            return Response(f"unreadable: {type(exc).__name__}", status_code=410)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def body_of(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            raise ValueError("send JSON (Content-Type: application/json)")
        return await request.json()

    async def verdict(request: Request):
        try:
            body = await body_of(request)
            day, image_id, label = day_of(body.get("day")), str(body["image_id"]), str(body["label"])
            if review.photo_row(wh, table, day, image_id) is None:
                return JSONResponse({"error": f"{image_id} is not a photo of {day}"}, status_code=404)
            got = review.record_verdict(wh, image_id, label, vocabulary, inspector=who(request))
        except CorrectionError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        return JSONResponse(got)

    async def undo(request: Request):
        try:
            body = await body_of(request)
            removed = review.retract_verdict(wh, day_of(body.get("day")), str(body["image_id"]),
                                             inspector=who(request), corrected_at=str(body["corrected_at"]))
        except (KeyError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        if not removed:
            return JSONResponse({"error": "no such verdict of yours to undo"}, status_code=404)
        return JSONResponse({"removed": removed})

    async def root_redirect(request: Request):
        return RedirectResponse(f"/?day={default_day.isoformat()}")

    return Starlette(routes=[Route("/", page), Route("/photo", photo), Route("/verdict", verdict, methods=["POST"]),
                             Route("/undo", undo, methods=["POST"]), Route("/index.html", root_redirect)])
