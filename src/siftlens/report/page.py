"""The one stylesheet and page shell of every siftlens HTML page (the analysis report, the comparison page,
discovery's report): self-contained, with the CSS inline, so a page opens offline."""

from __future__ import annotations

CSS = """
:root { --fg:#1d232b; --muted:#5b6470; --line:#dde2e8; --accent:#1f5fa8; --bg:#ffffff; --soft:#f5f7fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.5;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.container { max-width: 1160px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin: 1.8em 0 0.6em; padding-bottom: 0.2em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.subtitle { color: var(--muted); margin: 0 0 1em; }
.findings { background: var(--soft); border-left: 4px solid var(--accent); padding: 12px 18px 12px 36px;
            margin: 0; }
.findings li { margin: 0.35em 0; }
.card { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 14px 22px; }
.card table { width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.kv th { width: 42%; font-weight: 500; }
.kv td { word-break: break-word; }
figure { margin: 1.2em 0 2em; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; border: 1px solid var(--line); }
figcaption { color: var(--fg); font-size: 0.93em; margin-top: 0.5em; }
figcaption strong.title { display: block; font-size: 1.05em; margin-bottom: 0.2em; }
tr.sig td { background: #fff4e5; }
.top { width: auto; min-width: 60%; }
details { background: var(--soft); padding: 8px 14px; border-radius: 4px; }
details summary { cursor: pointer; font-weight: 600; }
details ul { margin: 0.5em 0; padding-left: 1.2em; max-height: 400px; overflow: auto; }
code { font-size: 0.92em; background: #eef1f5; padding: 0 3px; border-radius: 3px; word-break: break-all; }
dl.glossary dt { font-weight: 700; margin-top: 0.6em; }
dl.glossary dd { margin: 0.1em 0 0 1.2em; }
.muted { color: var(--muted); }
footer { margin-top: 3em; color: var(--muted); font-size: 0.85em; }
.note { color: var(--muted); font-size: 0.9em; }
.ok { color: #0a0; }
.bad { color: #c00; }
.gal { display: flex; flex-wrap: wrap; gap: 6px; margin: 0.3em 0 1.2em; }
.gal figure { margin: 0; text-align: center; font-size: 0.7em; color: var(--muted); }
.gal img { image-rendering: pixelated; border: 1px solid #999; }
"""


def page(title: str, body: str) -> str:
    """A whole HTML page: ``title`` (already HTML-escaped) and ``body`` (HTML) inside the shared shell."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{CSS}</style>
</head>
<body>
<div class="container">
{body}
</div>
</body>
</html>
"""
