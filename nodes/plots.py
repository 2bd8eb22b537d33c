"""Small labelled charts for the graph editor, drawn with Pillow (lazy import) into IMAGE tensors."""
from __future__ import annotations

import numpy as np
import torch

PALETTE = [(230, 85, 60), (60, 130, 220), (90, 180, 90), (200, 160, 40), (160, 90, 200), (40, 170, 170),
           (220, 110, 170), (120, 120, 120)]


def _to_image(img) -> torch.Tensor:
    """PIL RGB image -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _panel(draw, box, series, title, xlabel, font):
    """Line chart of ``series`` [(label, values, colour)] inside ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(80, 80, 80))
    draw.text((x0 + 4, y0 - 14), title, fill=(20, 20, 20), font=font)
    draw.text((x1 - 6 * len(xlabel) - 4, y1 + 3), xlabel, fill=(60, 60, 60), font=font)
    values = [v for _, vals, _ in series for v in vals if np.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    draw.text((x0 + 2, y0 + 2), f"{hi:.3f}", fill=(90, 90, 90), font=font)
    draw.text((x0 + 2, y1 - 12), f"{lo:.3f}", fill=(90, 90, 90), font=font)
    for _, vals, colour in series:
        if len(vals) < 2:
            continue
        pts = [(x0 + (x1 - x0) * i / (len(vals) - 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for i, v in enumerate(vals)]
        draw.line(pts, fill=colour, width=2)


def profile_plot(profile: dict) -> torch.Tensor:
    """Each LoRA's radial spectrum (left) and high-frequency score over steps (right), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = 900, 420
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    rows = [("no LoRA (baseline)", profile["baseline"], (0, 0, 0))]
    rows += [(f"{_short(e['name'])} [{e['set']}]", e, PALETTE[i % len(PALETTE)]) for i, e in enumerate(profile["loras"])]
    spectra = [(label, e["profile"], c) for label, e, c in rows]
    curves = [(label, e["curve"], c) for label, e, c in rows]
    _panel(draw, (40, 30, 430, 300), spectra, f"radial log-amplitude spectrum ({profile['source']})", "radius", font)
    _panel(draw, (480, 30, 870, 300), curves, "high-frequency score of predicted x0", "step", font)
    y = 318
    for label, e, c in rows:
        draw.rectangle((40, y + 3, 52, y + 11), fill=c)
        draw.text((58, y), f"{label}: score {e['score']:.4f}", fill=(20, 20, 20), font=font)
        y += 15
    draw.text((480, 318), "H (high-frequency, early): " + (", ".join(map(_short, profile["high"])) or "-"),
              fill=(20, 20, 20), font=font)
    draw.text((480, 334), "L (low-frequency, late): " + (", ".join(map(_short, profile["low"])) or "-"),
              fill=(20, 20, 20), font=font)
    return _to_image(img)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".ckpt", ".pt")) else name


def timeline_plot(names: list[str], plans: list, title: str) -> torch.Tensor:
    """A grid, LoRAs by steps: dominant LoRA outlined; full, shallow and reused passes shaded."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    steps = len(plans)
    cell = max(6, min(28, 600 // max(1, steps)))
    left, top = 200, 56
    w = max(left + cell * steps + 20, 720)
    h = top + cell * len(names) + 50
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(title.split("\n")):
        draw.text((10, 8 + 15 * k), line, fill=(20, 20, 20), font=font)
    shade = {"full": (40, 90, 200), "shallow": (160, 190, 235), "reuse": (225, 225, 225)}
    for r, name in enumerate(names):
        draw.text((10, top + r * cell + cell // 2 - 6), _short(name)[:30], fill=(20, 20, 20), font=font)
        for c, plan in enumerate(plans):
            box = (left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1)
            draw.rectangle(box, fill=shade[plan.passes[r]])
            if plan.dominant == r:
                draw.rectangle(box, outline=(230, 60, 40), width=2)
    y = top + cell * len(names) + 8
    draw.text((left, y), f"steps 0..{steps - 1} (phase per step: {''.join(p.phase for p in plans)})",
              fill=(60, 60, 60), font=font)
    draw.text((left, y + 15), "dark: full pass   light: shallow pass   grey: reused   red frame: dominant",
              fill=(60, 60, 60), font=font)
    return _to_image(img)
