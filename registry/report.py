"""``lmpipe report RUN``: one HTML page a person would rather look at than read.

Loss curve and validation perplexity as PNG plots, the champion-versus-candidate table,
the data-check outcome with a link to its Data Docs, and the lineage. A run folder on S3 is
reported from a local copy of the files the page needs, and the report is uploaded beside
them with its plots inlined, so the page stands alone (a presigned URL shows all of it).
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from lmpipe.errors import LmpipeError
from lmpipe.log import log
from lmpipe.storage import is_s3, open_store

INPUTS = ("train_config.json", "metrics.jsonl", "eval/metrics.json", "data/data_checks.json", "data/manifest.json",
          "model_version.json")

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.35rem .7rem;text-align:left}
th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
img{max-width:100%;border:1px solid #eee}code{background:#f6f8fa;padding:0 .2rem}"""


def _plot_loss(metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="#0969da", lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_ppl(rows: list[tuple[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bars = ax.bar([r[0] for r in rows], [r[1] for r in rows], color=["#1a7f37", "#8250df"][: len(rows)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Held-out perplexity (same validation shards)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def build_uri(run: str, storage=None) -> str:
    """The report of a run folder, local or on S3; returns where its index.html is."""
    if not is_s3(run):
        return str(build(open_store(run).root))
    store = open_store(run, storage)
    with tempfile.TemporaryDirectory(prefix="lmpipe-report-") as d:
        for name in INPUTS:
            if store.exists(name):
                store.get_file(name, Path(d) / name)
        build(Path(d), inline=True, label=store.uri)
        for p in sorted((Path(d) / "report").iterdir()):
            store.put_file(f"report/{p.name}", p)
    return store.url("report/index.html")


def build(run: str | Path, inline: bool = False, label: str | None = None) -> Path:
    """``RUN/report/index.html``; ``inline`` puts the plots in the page itself."""
    run = Path(run)
    if not (run / "train_config.json").is_file():
        raise LmpipeError(f"{run} is not an lmpipe training run folder (no train_config.json)")
    out = run / "report"
    out.mkdir(exist_ok=True)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
    parts = [f"<h1>lmpipe run report</h1><p>Run folder <code>{html.escape(label or str(run))}</code></p>",
             *_training(metrics, out), *_comparison(_read(run / "eval" / "metrics.json"), out),
             *_checks(_read(run / "data" / "data_checks.json")), *_curation(_read(run / "data" / "manifest.json"), out),
             *_lineage_table(_read(run / "model_version.json"))]
    if inline:
        parts = [_inline_images(p, out) for p in parts]
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>lmpipe report</title><style>{STYLE}</style>"
                    f"</head><body>{''.join(parts)}</body></html>")
    log(f"report: {page}")
    return page


def _inline_images(part: str, out: Path) -> str:
    for name in ("loss.png", "perplexity.png", "funnel.png"):
        if f'src="{name}"' in part:
            data = base64.b64encode((out / name).read_bytes()).decode()
            part = part.replace(f'src="{name}"', f'src="data:image/png;base64,{data}"')
    return part


def _training(metrics: list[dict], out: Path) -> list[str]:
    parts = ["<h2>Training</h2>"]
    if not metrics:
        return [*parts, "<p>No metrics logged yet.</p>"]
    _plot_loss(metrics, out / "loss.png")
    last = metrics[-1]
    return [*parts, '<img id="loss-plot" src="loss.png" alt="training loss curve">',
            f"<p>{len(metrics)} logged steps; final loss {last['loss']:.4f} at step {last['step']}, "
            f"{last.get('tokens_per_s', 0):,} tokens/s.</p>"]


def _comparison(ev: dict | None, out: Path) -> list[str]:
    parts = ["<h2>Champion versus candidate</h2>"]
    if not ev:
        return [*parts, "<p>Not evaluated yet: run <code>lmpipe evaluate</code>.</p>"]
    rows, plot = [], []
    for role in ("candidate", "champion"):
        r = ev.get(role)
        if not r:
            continue
        who = f"v{r['version']}" if r.get("version") else html.escape(str(r["ref"]))
        if r["comparable"]:
            rows.append(f"<tr><td>{role}</td><td>{who}</td><td>{r['perplexity']:.3f}</td><td>{r['mean_loss']:.4f}</td>"
                        f"<td>{r['tokens']:,}</td></tr>")
            plot.append((f"{role} {who}", r["perplexity"]))
        else:
            rows.append(f"<tr><td>{role}</td><td>{who}</td><td colspan=3 class=bad>not comparable: "
                        f"{html.escape(r['reason'])}</td></tr>")
    if plot:
        _plot_ppl(plot, out / "perplexity.png")
        parts.append('<img id="ppl-plot" src="perplexity.png" alt="validation perplexity">')
    parts.append('<table id="comparison"><tr><th>role</th><th>model</th><th>perplexity</th><th>mean loss</th>'
                 f"<th>tokens</th></tr>{''.join(rows)}</table>"
                 f"<p>Validation shards: <code>{html.escape(ev['shards'])}</code></p>")
    samples = ev["candidate"].get("samples") or []
    if samples:
        parts.append("<h3>Samples (greedy)</h3><table><tr><th>prompt</th><th>completion</th></tr>" + "".join(
            f"<tr><td><code>{html.escape(s['prompt'])}</code></td><td><code>{html.escape(s['completion'])}</code></td></tr>"
            for s in samples) + "</table>")
    return parts


def _checks(checks: dict | None) -> list[str]:
    parts = ["<h2>Data checks</h2>"]
    if not (checks and checks.get("result")):
        return [*parts, "<p class=bad>No data-check result found for these shards.</p>"]
    ok = checks["success"]
    docs = checks.get("data_docs") or ""
    href = docs if "://" in docs else Path(docs).as_uri() if docs else ""
    return [*parts, f"<p class={'ok' if ok else 'bad'}>{'passed' if ok else 'FAILED'}</p>"
                    f'<p><a id="data-docs" href="{html.escape(href)}">Open the Data Docs</a> · result '
                    f"<code>{html.escape(checks['result'])}</code></p>"]


def _curation(m: dict | None, out: Path) -> list[str]:
    """The shard set's curation funnel: a chart, and each step's removals by reason."""
    cur = (m or {}).get("curation")
    if not cur:
        return []
    from lmpipe.charts import funnel_png

    funnel_png(cur["documents_in"], [(s["step"], s["removed"]) for s in cur["funnel"]], out / "funnel.png")
    rows = "".join(f"<tr><td>{html.escape(s['step'])}</td><td>{s['removed']:,}</td><td>"
                   + html.escape(", ".join(f"{k} {v:,}" for k, v in s["reasons"].items()) or "-") + "</td></tr>"
                   for s in cur["funnel"])
    langs = ", ".join(f"{k} {v:,}" for k, v in sorted(cur.get("languages", {}).items(), key=lambda kv: -kv[1])[:10])
    return ["<h2>Curation</h2>", '<img id="funnel-plot" src="funnel.png" alt="curation funnel">',
            f'<table id="funnel"><tr><th>step</th><th>removed</th><th>by reason</th></tr>{rows}</table>',
            f"<p>{cur['documents_in']:,} documents in, {cur['documents_out']:,} out."
            + (f" Languages: {html.escape(langs)}." if langs else "") + "</p>"]


def _lineage_table(mv: dict | None) -> list[str]:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>"
                   for k, v in _lineage(mv).items())
    return ["<h2>Lineage</h2>", f'<table id="lineage">{rows}</table>']


def _lineage(mv: dict | None) -> dict:
    if not mv:
        return {"model version": "not registered"}
    out = {"model version": f"models:/{mv['name']}/{mv['version']}", "MLflow run": mv["run_id"]}
    try:
        from registry import tracking

        v = tracking.client(tracking.TrackingConfig()).get_model_version(mv["name"], str(mv["version"]))
        out.update({k.removeprefix("lmpipe."): val for k, val in sorted(v.tags.items())
                    if k.startswith("lmpipe.") and not k.startswith("lmpipe.promotion.2")})
        out["aliases"] = ", ".join(v.aliases) or "-"
    except Exception as exc:  # the page still renders without the registry
        out["registry"] = f"unavailable: {exc}"
    return out
