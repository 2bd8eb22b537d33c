"""Labelled pictures for the graph editor, drawn with Pillow (imported lazily) into IMAGE tensors.

A node's preview shows an image scaled down to the node's width (a Preview Image node 300
pixels wide shows an 800 pixel picture at 3/8 size), so the pictures are 800 pixels wide with
24-34 pixel text; names that do not fit are shortened with an ellipsis, never cut at the edge.
"""
from __future__ import annotations

import numpy as np
import torch

PALETTE = [(230, 85, 60), (60, 130, 220), (90, 180, 90), (200, 160, 40), (160, 90, 200), (40, 170, 170),
           (220, 110, 170), (120, 120, 120)]
PALETTE_NAMES = ["red", "blue", "green", "yellow", "purple", "teal", "pink", "grey"]

INK, SOFT, FRAME, PAPER = (20, 20, 20), (90, 90, 90), (150, 150, 150), (250, 250, 250)
TITLE, BODY, SMALL = 34, 28, 24  # font sizes in pixels of the drawn image
GUTTER = 64  # room left of a chart for its value labels
WIDTH = 800  # of the plot and the timeline: a 300 pixel wide preview shows their text at about 10 px

# the schedule timeline's cells
SHADE = {"full": (40, 90, 200), "shallow": (160, 190, 235), "reuse": (225, 225, 225),
         "off": (255, 255, 255)}  # off: outside the LoRA's step range, no pass
LEAD = (230, 60, 40)
SMALL_IMAGE = 256  # overlays smaller than this get only the concept words in their legend
SET_COLOUR = {"H": (200, 110, 20), "L": (70, 110, 170), "-": (150, 150, 150)}  # -: no LoRA on
SET_WORDS = {"H": "H (early, fine detail)", "L": "L (late, broad shapes)"}


def colour_of(i: int) -> tuple[tuple[int, int, int], str]:
    """The colour (RGB and its name) that marks LoRA ``i`` in every picture."""
    return PALETTE[i % len(PALETTE)], PALETTE_NAMES[i % len(PALETTE)]


def _to_image(img) -> torch.Tensor:
    """PIL RGB image -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has only the small bitmap font
        return ImageFont.load_default()


def short_name(name: str) -> str:
    """A LoRA file name without its extension."""
    return name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".ckpt", ".pt", ".bin")) else name


def fit(text: str, width: float, measure) -> str:
    """``text``, shortened with an ellipsis until ``measure(text)`` fits in ``width``."""
    if measure(text) <= width:
        return text
    while text and measure(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _line_height(font) -> int:
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    return ascent + descent


def _text(draw, xy, text, font, width=None, fill=INK):
    """Draw one line, ellipsized to ``width`` when given; returns the text drawn."""
    if width is not None:
        text = fit(text, width, lambda t: draw.textlength(t, font=font))
    draw.text(xy, text, fill=fill, font=font)
    return text


def _wrap(draw, text: str, font, width: float) -> list[str]:
    """``text`` broken at spaces into lines that fit ``width`` (a word too long alone is ellipsized)."""
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    return [fit(x, width, lambda t: draw.textlength(t, font=font)) for x in lines]


def _dashed_vline(draw, x, y0, y1, fill, dash=8):
    for y in range(int(y0), int(y1), 2 * dash):
        draw.line([(x, y), (x, min(y + dash, y1))], fill=fill, width=2)


def _panel(draw, box, series, title, x_labels, fonts, mark=None):
    """Line chart of ``series`` [(values, colour)] in ``box`` (x0, y0, x1, y1), titled above, its
    value range written left of the box (keep GUTTER pixels free there), ``x_labels`` (left, right)
    below; ``mark`` = (fraction, label) draws a dashed line at that fraction of the x axis."""
    title_font, small = fonts
    x0, y0, x1, y1 = box
    _text(draw, (x0 - GUTTER, y0 - _line_height(title_font) - 6), title, title_font, width=x1 - x0 + GUTTER)
    draw.rectangle(box, outline=FRAME, width=2)
    left, right = x_labels
    draw.text((x0, y1 + 6), left, fill=SOFT, font=small)
    draw.text((x1 - draw.textlength(right, font=small), y1 + 6), right, fill=SOFT, font=small)
    if mark is not None:
        fraction, label = mark
        mx = x0 + (x1 - x0) * fraction
        _dashed_vline(draw, mx, y0 + 2, y1 - 2, FRAME)
        _text(draw, (mx + 8, y0 + 6), label, small, width=x1 - mx - 12, fill=SOFT)
    values = [v for vals, _ in series for v in vals if np.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    for value, y in ((hi, y0), (lo, y1 - _line_height(small))):
        label = f"{value:.3g}"
        draw.text((x0 - 8 - draw.textlength(label, font=small), y), label, fill=SOFT, font=small)
    for vals, colour in series:
        if len(vals) < 2:
            continue
        pts = [(x0 + (x1 - x0) * i / (len(vals) - 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for i, v in enumerate(vals)]
        draw.line(pts, fill=colour, width=4)


def profile_rows(profile: dict) -> list[tuple[str, str, str, str, tuple[int, int, int]]]:
    """The profile plot's legend, a row per curve: (name, set, score, note, colour); the baseline first,
    then each LoRA in stack order. The note says when the LoRA's category, not its score, chose the set."""
    rows = [("no LoRA (baseline)", "", f"{profile['baseline']['score']:.4f}", "", (0, 0, 0))]
    for i, e in enumerate(profile["loras"]):
        note = "" if e.get("category", "auto") == "auto" else "by category"
        rows.append((short_name(e["name"]), e["set"], f"{e['score']:.4f}", note, colour_of(i)[0]))
    return rows


def profile_plot(profile: dict) -> torch.Tensor:
    """Each LoRA's radial spectrum (left) and high-frequency score over the steps (right), with a legend."""
    from PIL import Image, ImageDraw

    body, small = _font(BODY), _font(SMALL)
    w, margin, gap = WIDTH, 20, 24
    panel_w = (w - 2 * margin - gap - 2 * GUTTER) // 2
    panel_h = 200
    rows = profile_rows(profile)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    key = _wrap(probe, "H: more fine detail than the baseline, leads the early steps. "
                "L: broad shapes, leads the late steps.", small, w - 2 * margin)
    row_h = _line_height(body) + 6
    top = margin + _line_height(body) + 8
    legend_top = top + panel_h + _line_height(small) + 16
    h = legend_top + row_h * (len(rows) + 1) + (_line_height(small) + 2) * len(key) + 2 * margin
    img = Image.new("RGB", (w, h), PAPER)
    draw = ImageDraw.Draw(img)
    series = [(profile["baseline"], (0, 0, 0))] + [(e, colour_of(i)[0]) for i, e in enumerate(profile["loras"])]
    steps = max((len(e["curve"]) for e, _ in series), default=0)
    source = "decoded image" if profile.get("source") == "image" else "final latent"
    cutoff = float(profile.get("cutoff", 0.2))
    x = margin + GUTTER
    _panel(draw, (x, top, x + panel_w, top + panel_h), [(e["profile"], c) for e, c in series],
           f"Spectrum ({source})", ("centre", "corners"), (body, small), mark=(cutoff, "scored"))
    x += panel_w + gap + GUTTER
    _panel(draw, (x, top, x + panel_w, top + panel_h), [(e["curve"], c) for e, c in series],
           "Detail score per step", ("step 1", f"step {steps}"), (body, small))
    # the legend, a table: line colour, name, set, score, note
    width = lambda t: draw.textlength(t, font=body)  # noqa: E731
    note_w = max(width(r[3]) for r in rows)
    score_w = max(width("score"), *(width(r[2]) for r in rows))
    set_w = width("set")
    name_x = margin + 52
    score_x = w - margin - note_w - (20 if note_w else 0) - score_w
    set_x = score_x - 24 - set_w
    y = legend_top
    for text, x in (("LoRA", name_x), ("set", set_x), ("score", score_x)):
        draw.text((x, y), text, fill=SOFT, font=body)
    y += row_h
    for name, key_set, score, note, colour in rows:
        draw.line([(margin, y + row_h // 2), (margin + 40, y + row_h // 2)], fill=colour, width=6)
        _text(draw, (name_x, y), name, body, width=set_x - 16 - name_x)
        draw.text((set_x + (set_w - width(key_set)) / 2, y), key_set, fill=SET_COLOUR.get(key_set, INK), font=body)
        draw.text((score_x + score_w - width(score), y), score, fill=INK, font=body)
        if note:
            draw.text((w - margin - width(note), y), note, fill=SOFT, font=body)
        y += row_h
    for line in key:
        draw.text((margin, y + 4), line, fill=SOFT, font=small)
        y += _line_height(small) + 2
    return _to_image(img)


def step_sets(plans: list, high) -> str:
    """Per step, the set of the LoRA that leads it: 'H' when the dominant LoRA is a high-frequency
    one, else 'L'. (A planner's own phase only says early or late: with no H LoRAs the L LoRAs lead
    the early steps too.) '-' for a step with no LoRA on (step ranges)."""
    high = set(high)
    return "".join("-" if plan.dominant is None else "H" if plan.dominant in high else "L" for plan in plans)


def set_lines(names: list[str], high, low) -> list[str]:
    """The timeline's two lines naming the LoRAs of each set ('-' for an empty set)."""
    return [f"{SET_WORDS[key]}: " + (", ".join(short_name(names[i]) for i in idx) or "-")
            for key, idx in (("H", high), ("L", low))]


def timeline_plot(names: list[str], plans: list, high, low, heading: str) -> torch.Tensor:
    """A grid, LoRAs by steps: the leading (dominant) LoRA framed red; full, shallow and reused
    passes shaded; above it the set (H or L) that leads each step; the sets named in the heading."""
    from PIL import Image, ImageDraw

    title, body, small = _font(TITLE), _font(BODY), _font(SMALL)
    steps, margin = len(plans), 20
    longest = max([body.getlength(short_name(n)) for n in names] + [body.getlength("leads")])
    name_w = int(min(longest + 16, WIDTH * 0.3))
    cell = max(3, min(44, (WIDTH - 2 * margin - name_w) // max(1, steps)))
    row = 40
    w = max(WIDTH, margin * 2 + name_w + cell * steps)
    text_w = w - 2 * margin
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head = _wrap(probe, heading, title, text_w)
    sets = [(line, SET_COLOUR[text[0]]) for text in set_lines(names, high, low)
            for line in _wrap(probe, text, body, text_w)]
    top = margin + len(head) * (_line_height(title) + 4) + len(sets) * (_line_height(body) + 4) + 16
    grid_top = top + row  # the "leads" row comes first
    legend_y = grid_top + row * len(names) + _line_height(small) + 24
    h = legend_y + _line_height(small) + margin + 8
    img = Image.new("RGB", (w, h), PAPER)
    draw = ImageDraw.Draw(img)
    y = margin
    for line in head:
        draw.text((margin, y), line, fill=INK, font=title)
        y += _line_height(title) + 4
    for line, colour in sets:
        draw.text((margin, y), line, fill=colour, font=body)
        y += _line_height(body) + 4
    left = margin + name_w
    _text(draw, (margin, top + (row - _line_height(body)) // 2), "leads", body, width=name_w - 12)
    for c, key in enumerate(step_sets(plans, high)):
        box = (left + c * cell, top + 4, left + (c + 1) * cell - 1, top + row - 4)
        draw.rectangle(box, fill=SET_COLOUR[key])
        if cell >= 22:
            draw.text((box[0] + (cell - draw.textlength(key, font=small)) / 2, box[1] + 4), key,
                      fill=PAPER, font=small)
    for r, name in enumerate(names):
        ry = grid_top + r * row
        _text(draw, (margin, ry + (row - _line_height(body)) // 2), short_name(name), body, width=name_w - 12)
        for c, plan in enumerate(plans):
            box = (left + c * cell, ry, left + (c + 1) * cell - 1, ry + row - 2)
            draw.rectangle(box, fill=SHADE[plan.passes[r]])
            if plan.dominant == r:
                draw.rectangle(box, outline=LEAD, width=3 if cell >= 8 else 1)
    tick_y = grid_top + row * len(names) + 4
    every = max(1, -(-steps * 60 // max(1, cell * steps)))  # a label at least every 60 pixels
    every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, steps) if k >= every)
    for c in range(0, steps, every):
        draw.text((left + c * cell, tick_y), str(c), fill=SOFT, font=small)
    x = margin
    for label, fill, outline in (("full pass", SHADE["full"], None), ("shallow pass", SHADE["shallow"], None),
                                 ("reused", SHADE["reuse"], None), ("leads (dominant)", PAPER, LEAD)):
        draw.rectangle((x, legend_y + 4, x + 26, legend_y + 26), fill=fill, outline=outline, width=3)
        draw.text((x + 34, legend_y), label, fill=INK, font=small)
        x += 34 + draw.textlength(label, font=small) + 30
    return _to_image(img)


def mask_legend(labels: list[str]) -> list[str]:
    """'colour: label' per subject LoRA, in the overlay's colours."""
    return [f"{colour_of(i)[1]}: {label}" for i, label in enumerate(labels)]


def draw_mask_legend(images: torch.Tensor, labels: list[str], short: list[str] | None = None) -> torch.Tensor:
    """IMAGE (b, H, W, 3) with a legend box (a swatch and a label per subject LoRA, in the overlay's
    colours) in its lower left corner, the text scaled to the image; the pixels outside the box are
    unchanged. Images under SMALL_IMAGE pixels on a side get the ``short`` labels (the concept words)
    when given, to cover less of the picture; under 128 pixels they are returned as they are (the
    node's text says it)."""
    from PIL import Image, ImageDraw

    b, h, w, _ = images.shape
    if min(h, w) < 128 or not labels:
        return images
    if short is not None and min(h, w) < SMALL_IMAGE:
        labels = short
    font = _font(max(10, min(h, w) // 24))
    line = _line_height(font) + 4
    swatch = line - 8
    measure = lambda t: font.getlength(t)  # noqa: E731
    texts = [fit(t, w * 0.6, measure) for t in labels]
    box_w = int(swatch + 12 + max(measure(t) for t in texts) + 16)
    box_h = min(h - 16, line * len(texts) + 10)
    x0, y0 = 8, h - box_h - 8
    out = images.clone()
    for k in range(b):
        region = images[k, y0:y0 + box_h, x0:x0 + box_w].clamp(0, 1).cpu().numpy()
        img = Image.fromarray((region * 255).round().astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img, "RGBA")
        draw.rectangle((0, 0, box_w - 1, box_h - 1), fill=(255, 255, 255, 200))
        for i, text in enumerate(texts):
            y = 5 + i * line
            draw.rectangle((6, y + 4, 6 + swatch, y + 4 + swatch), fill=colour_of(i)[0])
            draw.text((6 + swatch + 8, y), text, fill=INK, font=font)
        out[k, y0:y0 + box_h, x0:x0 + box_w] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return out
