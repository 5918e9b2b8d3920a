"""The self-contained HTML report of a discovery run. Rendering only: from a finished
:class:`~siftlens.shortcuts.DiscoveryResult` to ``report.html`` (discovery itself runs elsewhere). Per
class, the ranked candidate words with a gallery of example patches (crops enlarged without smoothing,
the word's keypoints drawn as circles).

Images are embedded as base64 PNG data URIs and the page is :func:`siftlens.report.page.page` (the one
stylesheet and shell of every siftlens page), so it opens offline; every piece of text from data (image and
class names) is escaped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np

from ...io import write_text
from ...report.page import page
from .decision import claim_text

EXPLAIN = (
    "For each class, the candidates that images <em>predicted</em> as that class hold: visual words (source "
    "<em>sift</em>: clusters of SIFT descriptors) and region words (source <em>region</em>: clusters of the "
    "model's own patch embeddings, one per patch, so they cover weakly textured shortcuts too), ranked together "
    " by <strong>score = share × max(assoc, 0) × (max(causal, 0) + 0.01)</strong>"
    "{boxes}. <strong>share</strong>: fraction of the CLS token's attention those images put on the patches "
    "holding the word. <strong>lift</strong>: that attention relative to uniform attention over the same "
    "patches (1 = no preference). <strong>assoc</strong>: log-odds of the word being present in this class's "
    "predictions versus the others'. <strong>causal</strong>: mean fall of the predicted class's probability "
    "when the word's patches are occluded, minus the fall when as many other patches with the same SIFT "
    "keypoint counts (texture-matched control) are occluded "
    "(checked for the best candidates only; '–' = not checked). A high score marks a word the model looks "
    "at, that comes with the class, and that the prediction depends on: a candidate shortcut. The gallery "
    "shows example patches (crops around one keypoint of the word, enlarged; circles are the word's "
    "keypoints, radius = keypoint size / 2; for a region, the SIFT keypoints inside its patches). "
    "<strong>kp/patch</strong>: mean SIFT keypoints per patch of the candidate."
)

DECIDE = (
    "<strong>A flag is a tested claim.</strong> For every checked candidate, <strong>effect</strong> is the mean "
    "over its images of the paired difference (fall of p(class) with the word's patches occluded minus the fall "
    "with the matched control patches occluded), with a 95% bootstrap interval over images; <strong>p</strong> "
    "is a one-sided sign-flip test of effect &gt; 0 and <strong>q</strong> its Benjamini-Hochberg correction over "
    "all {tested} candidates tested. A candidate is <strong>flagged</strong> when q &lt; {alpha:g} and effect "
    "&ge; {min_effect:g}; a class with no flagged candidate reads <em>no shortcut found</em>. prompt and repair "
    "use flagged candidates only."
)
TEST_NOTE = {  # --causal-test other than occlude: what its test adds to the rule above
    "insert": " This run decides on the <strong>insertion</strong> test instead: the rise of p(class) with the "
              "word's patches pasted into an image predicted as another class, minus the rise with the matched "
              "control patches pasted, with the same interval, test and correction.",
    "both": " This run also runs the <strong>insertion</strong> test (the rise of p(class) with the word's patches "
            "pasted into an image predicted as another class, minus the rise with the matched control patches "
            "pasted): a flag needs both tests, and q is the larger of the two.",
    "cross": " This run also runs the <strong>cross-class</strong> test: the same paired difference on images "
             "<em>labelled</em> as another class that hold the word (a shortcut pulls them to the class, a core "
             "feature of the class rarely does): an occlusion flag stays only when that test confirms it (cross q, "
             "Benjamini-Hochberg over the candidates occlusion flagged, below alpha).",
    "reference": " This run also occludes the same patches in the <strong>reference</strong> model (the model "
                 "fine-tuned from, or one trained on clean data): the <em>excess</em> of the paired difference over "
                 "the reference's is what the fine-tuning taught. A flag needs both tests (occlusion, and its excess "
                 "over the reference), q is the larger of the two, and both effects are at least the minimum.",
}


def verdict_html(result) -> str:
    """The decision block: the rule and, per class, 'no shortcut found' or its flagged candidates with effect,
    interval and q."""
    e = html.escape
    d = result.decision
    if not d:
        return ""
    test = d.get("causal_test", "occlude")
    parts = ["<h2>Decision</h2><p>" + DECIDE.format(**d) + TEST_NOTE.get(test, "") + "</p><table><tr>"
             "<th class='l'>class</th><th class='l'>verdict</th><th class='l'>flagged (word: effect [95% CI], q)</th>"
             "</tr>"]
    for c in result.class_names:
        fl = result.flagged(c)
        found = bool(fl)
        txt = "; ".join(f"{e(r.get('source', 'sift'))} {r['word']} (rank {_fmt(r.get('rank'))}): "
                        f"{e(claim_text(r, test, _fmt))}, q {_fmt(r['q'])}"
                        for r in fl)
        parts.append(f"<tr><td class='l'>{e(c)}</td><td class='l {'bad' if found else 'ok'}'>"
                     f"{e(result.verdict(c))}</td><td class='l'>{txt or '–'}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _png(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB image
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def render_crop(crop: np.ndarray, keypoints: list, scale: int | None = None) -> np.ndarray:
    """Enlarge ``crop`` (h, w, 3) uint8 by nearest neighbour to about 96 pixels and draw the keypoints
    (x, y, size) given in crop pixels as cyan circles."""
    h, w = crop.shape[:2]
    s = scale or max(1, 96 // max(h, w, 1))
    big = cv2.resize(np.ascontiguousarray(crop), (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    for x, y, size in keypoints:
        c = (int(round((x + 0.5) * s)), int(round((y + 0.5) * s)))
        r = max(2, int(round(size / 2 * s)))
        cv2.circle(big, c, r, (0, 0, 0), 3, lineType=cv2.LINE_AA)
        cv2.circle(big, c, r, (0, 255, 255), 1, lineType=cv2.LINE_AA)
    return big


def _fmt(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, str):
        return html.escape(v)
    return f"{v:.{nd}g}"


def discovery_html(result, title: str = "siftlens: spurious-correlation candidates") -> str:
    """The report page for a :class:`~siftlens.shortcuts.DiscoveryResult`."""
    e = html.escape
    m = result.manifest
    im = m["images"]
    has_off = "off_object" in result.candidates
    parts = [f"<h1>{e(title)}</h1>"]
    acc = im.get("accuracy")
    parts.append(
        f"<p class='note'>Model: {e(str(m['model'].get('source') or m['model'].get('class')))} · images: "
        f"{im['analysed']} analysed ({im['skipped']} skipped) from {e(str(im['source']))} · keypoints: "
        f"{im['keypoints']} · vocabulary: {len(result.vocabulary)} words · attention: "
        f"{e(m['config']['attention'])} · occlusion: {e(m['config']['occlude'])} · SIFT upsampling "
        f"u = {m['sift']['upsample_used']:g}" + (f" · accuracy on these images: {acc:.3f}" if acc is not None else "")
        + "</p>")
    parts.append("<p>" + EXPLAIN.format(boxes=" × off_object (share of the word's keypoints outside the "
                                               "object boxes)" if has_off else "") + "</p>")
    parts.append(verdict_html(result))
    ev = result.evaluation
    if ev:
        parts.append("<h2>Evaluation against the benchmark's marker boxes</h2><p class='note'>Used only to "
                     "score discovery, never for the ranking: a word belongs to a class's marker when at least "
                     "half of its keypoints lie inside that marker's boxes.</p><table><tr><th class='l'>class"
                     "</th><th>rank of own marker (word purity)</th><th>word</th><th>rank (patch rule: half "
                     "of the candidate's patches on the class's marker)</th></tr>")
        pr = ev.get("patch_rule") or {"ranks": {}}
        for c, r in ev["ranks"].items():
            cls = "ok" if r == 1 else "bad"
            r2 = pr["ranks"].get(c)
            parts.append(f"<tr><td class='l'>{e(c)}</td><td class='{cls}'>{_fmt(r)}</td>"
                         f"<td>{_fmt(ev['words'].get(c))}</td><td class='{'ok' if r2 == 1 else 'bad'}'>{_fmt(r2)}"
                         "</td></tr>")
        parts.append("</table>")
    cols = ["rank", "word", "source", "score", "share", "lift", "assoc", "causal", "effect_lo", "effect_hi", "q",
            "flagged", "support", "kp_per_patch"] + (["off_object"] if has_off else [])
    for c in result.class_names:
        rows = result.top.get(c, [])
        parts.append(f"<h2>{e(c)}</h2>")
        if result.decision:
            parts.append(f"<p class='note'>{e(result.verdict(c))}</p>")
        if not rows:
            parts.append("<p class='note'>No candidate: no image was predicted as this class, or no word was "
                         "seen often enough.</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th class='num'>{e(k)}</th>" for k in cols) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td class='num'>{_fmt(r.get(k))}</td>" for k in cols) + "</tr>")
        parts.append("</table>")
        for r in rows[:5]:
            ex = result.galleries.get((c, r["word"]), [])
            if not ex:
                continue
            parts.append(f"<div>{e(str(r.get('source', 'sift')))} word {r['word']} (rank {r['rank']})</div>"
                         "<div class='gal'>")
            for x in ex:
                img = render_crop(x["crop"], x["keypoints"])
                parts.append(f"<figure><img src='{_png(img)}' width='{img.shape[1]}' height='{img.shape[0]}' "
                             f"alt='{e(x['name'])}'><figcaption>{e(x['name'])}<br>attn ×{x['attention']:.2g}"
                             "</figcaption></figure>")
            parts.append("</div>")
    return page(e(title), "".join(parts))


def write_discovery_report(out_dir: str | Path, result) -> Path:
    """Write ``report.html`` into ``out_dir`` atomically; returns its path."""
    return write_text(Path(out_dir) / "report.html", discovery_html(result))
