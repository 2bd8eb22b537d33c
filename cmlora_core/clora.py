"""CLoRA: contrastive attention loss, latent-update plan, attention masks and fusion.

Shapes: b = latent batch, P = prompt branches (0 = base prompt, 1..N = one per subject
LoRA), h*w = tokens of the attention resolution, L = text tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_positions(prompt_ids: list[int], word_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of the token sequence ``word_ids`` in ``prompt_ids``."""
    n = len(word_ids)
    if n == 0:
        return []
    for i in range(len(prompt_ids) - n + 1):
        if prompt_ids[i:i + n] == word_ids:
            return list(range(i, i + n))
    return []


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each flattened map to [0, 1]. maps: (K, D)."""
    lo = maps.min(dim=1, keepdim=True).values
    hi = maps.max(dim=1, keepdim=True).values
    return (maps - lo) / (hi - lo).clamp_min(1e-8)


def nt_xent(maps: torch.Tensor, concept: list[int], temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (InfoNCE) over token maps; positives share a concept, negatives do not.

    maps: (K, D) one flattened attention map per (prompt variation, concept token);
    concept[k] is the concept of map k. After min-max normalisation, s_ij is the cosine
    similarity / temperature. Every ordered positive pair (a, p), a != p, contributes
    -log(e^{s_ap} / (e^{s_ap} + sum over a's negatives n of e^{s_an})) — the anchor's other
    positives are not in the denominator (pytorch-metric-learning's NTXentLoss, which the
    reference uses); the loss is the mean over positive pairs.
    """
    z = F.normalize(normalise_maps(maps), dim=1)
    sim = z @ z.t() / temperature
    k = sim.shape[0]
    # which pairs are positives and negatives depends only on ``concept``: built on the CPU, no device sync
    c = torch.tensor(concept)
    positive = (c[:, None] == c[None, :]) & ~torch.eye(k, dtype=torch.bool)
    negative = (c[:, None] != c[None, :]).to(sim.device)
    count = int(positive.sum())
    if count == 0:
        raise ValueError("NT-Xent needs at least two maps of one concept")
    negatives = torch.logsumexp(sim.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)  # -inf: none
    pair_loss = torch.logaddexp(sim, negatives) - sim  # -log(e^s_ap / (e^s_ap + sum_n e^s_an))
    return (pair_loss * positive.to(pair_loss)).sum() / count


def update_plan(total: int, stop_fraction: float = 0.5, extra_iterations: int = 20,
                extra_at: tuple[float, ...] = (0.0, 0.1, 0.2)) -> dict[int, int]:
    """Latent-update iterations per step: 1 for steps i < stop_fraction*T, plus
    ``extra_iterations`` at the steps round(f*T) for f in ``extra_at`` (when updating)."""
    stop = max(0, math.ceil(stop_fraction * total - 1e-9))  # i < f*T, float noise tolerated
    plan = {i: 1 for i in range(min(stop, total))}
    for f in extra_at:
        i = int(round(f * total))
        if i in plan:
            plan[i] += extra_iterations
    return plan


def x_space_step(eta: float, sigma: float) -> float:
    """The reference's step z <- z - eta*grad_z L, written for x = z / sqrt(abar) = z*sqrt(1+sigma^2):
    x <- x - eta*(1 + sigma^2)*grad_x L."""
    return eta * (1.0 + sigma * sigma)


def euler_correction(x: torch.Tensor, x_new: torch.Tensor, sigma: float, sigma_next: float,
                     keep: float = 1.0, gain: float | None = None) -> torch.Tensor:
    """What to add to the model's output, predicted at ``x_new``, so that the host's Euler step taken from
    ``x`` lands where an Euler step from ``x_new`` lands.

    The sampler keeps its own x; the model can only answer. The host turns an output into the denoised
    image affinely, D = keep * x + gain * output, always with its own x: epsilon prediction has keep 1 and
    gain -sigma, v-prediction keep 1 / (1 + sigma^2) and gain -sigma / sqrt(1 + sigma^2). Euler steps by
    (x - D) / sigma * h, h = sigma_next - sigma; equating the two steps gives
    (x - x_new) * (1 + (1 - keep) * h / sigma) * sigma / (gain * h), which for epsilon prediction (the
    default) is (x_new - x) / h. The host's DDIM runs as Euler, so it continues exactly too.
    """
    h = sigma_next - sigma
    gain = -sigma if gain is None else gain
    return (x - x_new) * ((1.0 + (1.0 - keep) * h / sigma) * sigma / (gain * h))


def concept_masks(maps: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Union over a concept's tokens of [A > threshold * max A], per batch element.

    maps: list of (b, h, w) token maps of one LoRA's concept. Returns (b, h, w) float {0, 1}.
    """
    out = torch.zeros_like(maps[0], dtype=torch.float32)
    for a in maps:
        peak = a.flatten(1).max(dim=1).values.reshape(-1, 1, 1)
        out = torch.maximum(out, (a > threshold * peak).float())
    return out


MORPHOLOGY = ("none", "dilate", "erode", "open", "close")


def morphology(masks: torch.Tensor, op: str) -> torch.Tensor:
    """3x3 binary morphology of {0, 1} masks (..., H, W) with a square element; pixels outside
    the image never count (dilation does not grow from them, erosion is not eaten by them).
    open = erode then dilate (drops specks), close = dilate then erode (fills pinholes)."""
    if op == "none":
        return masks
    if op not in MORPHOLOGY:
        raise ValueError(f"morphology must be one of {MORPHOLOGY}, got {op!r}")
    shape = masks.shape
    flat = masks.reshape(-1, 1, *shape[-2:]).float()

    def dilate(m):
        return F.max_pool2d(m, 3, stride=1, padding=1)  # padded with -inf: outside never wins

    def erode(m):
        return -F.max_pool2d(-m, 3, stride=1, padding=1)

    steps = {"dilate": (dilate,), "erode": (erode,), "open": (erode, dilate), "close": (dilate, erode)}[op]
    for f in steps:
        flat = f(flat)
    return flat.reshape(shape).to(masks.dtype)


def branch_masks(subject_masks: torch.Tensor, size: tuple[int, int], op: str = "none") -> torch.Tensor:
    """Masks of every branch at latent size: base first (pixels in no subject's mask).

    subject_masks: (N, b, h, w) -> (N+1, b, 1, H, W): nearest upsampling, then the 3x3
    morphology ``op`` on each subject's mask, then the base mask as what no subject covers.
    """
    n, b, h, w = subject_masks.shape
    up = F.interpolate(subject_masks.reshape(n * b, 1, h, w), size=size, mode="nearest").reshape(n, b, 1, *size)
    up = morphology(up, op)
    base = (up.sum(0, keepdim=True) == 0).float()
    return torch.cat([base, up], dim=0)


USER_MASK_MODES = ("replace", "add", "limit")


def fit_user_masks(masks: torch.Tensor, subjects: int, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """An artist's masks, one per subject (N, H, W) or one per subject and image (N*b, H, W, subject
    major, as CLoRA Masks outputs them), at ``size``: (N, b, h, w) in {0, 1}. Each mask is shrunk or
    grown by area averaging and a pixel is in where at least half of it was (a soft edge from a mask
    editor lands on one side or the other)."""
    k = masks.shape[0] // subjects
    if k * subjects != masks.shape[0] or k not in (1, batch):
        raise ValueError(f"{masks.shape[0]} masks for {subjects} subjects and {batch} images")
    m = masks.float().reshape(subjects * k, 1, *masks.shape[-2:])
    m = F.interpolate(m, size=size, mode="area") if tuple(m.shape[-2:]) != tuple(size) else m
    m = (m >= 0.5).float().reshape(subjects, k, *size)
    return m.expand(subjects, batch, *size) if k == 1 else m


def combine_user_masks(found: torch.Tensor, drawn: torch.Tensor, mode: str) -> torch.Tensor:
    """The subject masks CLoRA uses when an artist gives masks: ``replace`` takes the drawn ones,
    ``add`` the union with the ones found from attention, ``limit`` keeps the found ones only inside
    the drawn ones. Both (N, b, h, w) in {0, 1}."""
    if mode == "replace":
        return drawn
    if mode == "add":
        return torch.maximum(found, drawn)
    if mode == "limit":
        return found * drawn
    raise ValueError(f"mask mode must be one of {USER_MASK_MODES}, got {mode!r}")


def fuse(outputs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of branch predictions: sum_p M_p * eps_p / sum_p M_p.

    outputs: (P, b, C, H, W); masks: (P, b, 1, H, W), with every pixel in at least one mask.
    """
    return (outputs * masks).sum(0) / masks.sum(0).clamp_min(1e-8)


# ------------------------------------------------------------------ attention maps

def attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention that also returns its probabilities averaged over the heads.

    q: (b, n, c), k and v: (b, m, c) -> output (b, n, c) and probabilities (b, n, m), float32.
    """
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.reshape(b, -1, heads, d).transpose(1, 2)
    probs = (qh.float() @ kh.float().transpose(-1, -2) * d ** -0.5).softmax(-1)
    out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, n, c)
    return out, probs.mean(1)


def fit_tokens(context: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token axis to ``length`` (a multiple of it): attention over repeated keys is unchanged,
    so prompts of different lengths can share one batch."""
    return context if context.shape[1] == length else context.repeat(1, length // context.shape[1], 1)


def token_map(maps: torch.Tensor, position: int, width: int) -> torch.Tensor:
    """The map of the token at ``position`` of a ``width``-token prompt repeated along the last axis
    of ``maps`` (see ``fit_tokens``): the sum over its copies, as its share of attention."""
    return maps[..., position::width].sum(-1)


def subject_maps(maps: torch.Tensor, subjects: list[list[int]], widths: list[int], rows: int, b: int,
                 chunks: list[int], size: tuple[int, int]) -> list[list[torch.Tensor]]:
    """Per subject p (1..P-1): the maps of its concept's tokens in its own branch, (b, h, w) each.

    maps: (P*rows, h*w, L), the layer-averaged maps of P branches of ``rows`` rows each, a branch
    holding chunks (cond, uncond, ...) of ``b`` rows; ``chunks`` lists the chunks whose maps are
    averaged; ``subjects[p-1]`` the token positions of subject p in branch p's prompt of
    ``widths[p]`` tokens.
    """
    h, w = size
    out = []
    for p, positions in enumerate(subjects, start=1):
        per_token = []
        for t in positions:
            a = sum(token_map(maps[p * rows + j * b:p * rows + (j + 1) * b], t, widths[p]) for j in chunks)
            per_token.append((a / len(chunks)).reshape(b, h, w))
        out.append(per_token)
    return out


def contrastive_loss(maps: torch.Tensor, tokens: list[dict[int, list[int]]], widths: list[int], b: int,
                     temperature: float) -> torch.Tensor:
    """NT-Xent over every (branch, concept token) map, averaged over the latent batch.

    maps: (P*b, h*w, L) layer-averaged maps of P branches of b rows; ``tokens[p]`` maps a concept
    index to its token positions in branch p's prompt of ``widths[p]`` tokens.
    """
    total = 0.0
    for e in range(b):
        items, concept = [], []
        for p, by_concept in enumerate(tokens):
            for c, positions in by_concept.items():
                for t in positions:
                    items.append(token_map(maps[p * b + e], t, widths[p]))
                    concept.append(c)
        total = total + nt_xent(torch.stack(items), concept, temperature)
    return total / b
