"""`credit viz`: an HTML page of one batch's responses, each token coloured by its reward, with SDPO's
reward (a - s) and CREDIT's (a - s - lam (beta - s)) and the pure contrast (a - beta) side by side, so a
user sees which tokens each method credits: input-generic tokens (likely under any input once the
feedback is shown) are warm under SDPO and neutral under the contrast.
"""

from __future__ import annotations

import html
import json
import os

COLUMNS = [("sdpo", "SDPO  a - s"), ("credit", "CREDIT  a - s - lam (beta - s)"), ("credit_contrast", "contrast  a - beta")]


def _colour(value: float, scale: float) -> str:
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x >= 0:  # green for credit, red for blame
        return f"rgba(34,160,70,{0.85 * x:.3f})"
    return f"rgba(210,50,50,{0.85 * -x:.3f})"


def _tokens_html(tokens: list[str], values: list[float], scale: float) -> str:
    spans = []
    for tok, v in zip(tokens, values):
        text = html.escape(tok).replace("\n", "&#8629;<br>")
        spans.append(f'<span title="{v:+.3f}" style="background:{_colour(v, scale)}">{text}</span>')
    return "".join(spans)


def render(samples: dict) -> str:
    rows = samples["responses"]
    present = [(k, label) for k, label in COLUMNS if any(k in r for r in rows)]
    vals = [abs(v) for r in rows for k, _ in present for v in r.get(k, [])]
    scale = sorted(vals)[int(0.95 * (len(vals) - 1))] if vals else 1.0
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in present)
    body = []
    for r in rows:
        meta = (f"group {r['group']} &middot; reward {r['reward']:.2f} &middot; "
                f"{'<b>solved</b>' if r['success'] else 'failed'}")
        if r.get("feedback"):
            meta += f"<div class='fb'>feedback: {html.escape(r['feedback'][:300])}</div>"
        cells = "".join(
            f"<td>{_tokens_html(r['tokens'], r[k], scale) if k in r else '<i>no teacher signal</i>'}</td>"
            for k, _ in present
        )
        body.append(f"<tr><td class='meta'><div class='prompt'>{html.escape(r['prompt'][-200:])}</div>{meta}</td>"
                    f"{cells}</tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>credit viz: step {samples['step']}</title>
<style>body{{font-family:sans-serif;margin:16px}} table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ddd;padding:6px;vertical-align:top;font-size:13px}} td span{{font-family:monospace;
white-space:pre-wrap}} .meta{{width:22%;color:#333}} .prompt{{color:#666;font-size:11px;margin-bottom:4px}}
.fb{{color:#884;font-size:11px;margin-top:4px}}</style></head><body>
<h2>Per-token rewards, step {samples['step']} ({html.escape(samples['method'])}, lam = {samples['lam']})</h2>
<p>Green: the token is credited; red: blamed; colour scale = 95th percentile of |reward| ({scale:.3f}).
Hover a token for its value.</p>
<table><tr><th>response</th>{head}</tr>{''.join(body)}</table></body></html>"""


def latest_samples(run: str) -> str:
    folder = os.path.join(run, "samples")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise ValueError(f"--run {run}: no samples/step_*.json (train with --sample-every K and a teacher method)")
    return os.path.join(folder, files[-1])


def write_page(samples_path: str, out: str) -> str:
    with open(samples_path) as f:
        samples = json.load(f)
    with open(out, "w") as f:
        f.write(render(samples))
    return out
