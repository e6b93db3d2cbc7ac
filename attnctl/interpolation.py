"""The maths of attention interpolation (AID / PAID, He et al., NeurIPS 2024, arXiv 2403.17924).

Everything here is a plain function on tensors, beside a float64 reference where it computes attention:

- ``interpolated_attention``: inner, outer and fused interpolated attention on SDPA (no explicit softmax).
- ``beta_quantiles`` / ``fit_beta``: frame coefficients as quantiles of Beta(alpha, beta) (paper, Sec. 4.3), and
  the automatic choice of (alpha, beta) that evens out measured jumps between adjacent frames.
- ``slerp``: spherical interpolation of two initial noises (latent interpolation of two seeds).
- ``frame_distance`` / ``smoothness`` / ``consistency``: weight-free perceptual distances (1 - SSIM, mean CIE76
  colour difference in Lab) and the paper's sequence metrics (Sec. 5.1: smoothness = 1 - Gini of the adjacent
  distances, consistency = their mean, lower is better). LPIPS is used only where its weights are present.
- ``contact_strip`` / ``gif_bytes``: the outputs of a run.

Shapes: ``q`` (R, H, Sq, D); keys/values (R, H, Sk, D); ``t`` (R,) one coefficient per row.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F

from .errors import ControlError

MODES = ("inner", "outer")


# -- interpolated attention ---------------------------------------------------------------------------------
def _check_shapes(k_self, k_a, k_b, where: str = "interpolated attention") -> None:
    if k_a.shape != k_b.shape:
        raise ControlError(
            f"{where}: the endpoints' keys have different shapes {tuple(k_a.shape)} and {tuple(k_b.shape)}. "
            "Interpolation needs both prompts at one text length; this happens when the text encoder cannot pad "
            "them to a common length (e.g. prompt_embeds of different lengths): encode both at one length"
        )
    if k_self is not None and (k_self.shape[:2] != k_a.shape[:2] or k_self.shape[-1] != k_a.shape[-1]):
        raise ControlError(f"{where}: the frame's own keys {tuple(k_self.shape)} do not match the endpoints' "
                           f"{tuple(k_a.shape)} in batch, heads or head size")


def interpolated_attention(q, k_a, v_a, k_b, v_b, t, *, mode: str = "outer", k_self=None, v_self=None,
                           bias=None, scale: float | None = None) -> torch.Tensor:
    """Attention of frames between endpoint A and endpoint B.

    ``inner``: ``Attn(q, K_t, V_t)`` with ``K_t = (1 - t) K_A + t K_B`` (``V_t`` likewise).
    ``outer``: ``(1 - t) Attn(q, K_A, V_A) + t Attn(q, K_B, V_B)``.
    Fusion (``k_self``/``v_self`` given, the frame's own keys and values): every attention above runs over the
    concatenation ``[K_self, K_x]``, ``[V_self, V_x]``, which keeps the frame's fidelity (paper, Sec. 4.2).

    q: (R, H, Sq, D); k_a, v_a, k_b, v_b: (R, H, Sk, D) (broadcast rows allowed); t: (R,) in [0, 1];
    k_self, v_self: (R, H, Sk', D) or None; bias: additive, broadcastable to (R, H, Sq, Sk' + Sk) when fused,
    (R, H, Sq, Sk) otherwise. Returns (R, H, Sq, D). Computed with SDPA (no explicit softmax).
    """
    if mode not in MODES:
        raise ControlError(f"unknown interpolation mode {mode!r}; allowed: {', '.join(MODES)}")
    _check_shapes(k_self, k_a, k_b)
    t = torch.as_tensor(t, dtype=q.dtype, device=q.device).reshape(-1, 1, 1, 1)

    def keys(k, v):
        if k_self is None:
            return k, v
        return torch.cat([k_self, k.expand(k_self.shape[0], -1, -1, -1)], dim=2), \
            torch.cat([v_self, v.expand(v_self.shape[0], -1, -1, -1)], dim=2)

    if mode == "inner":
        k, v = keys(torch.lerp(k_a, k_b, t), torch.lerp(v_a, v_b, t))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    rows = q.shape[0]
    k1, v1 = keys(k_a.expand(rows, -1, -1, -1), v_a.expand(rows, -1, -1, -1))
    k2, v2 = keys(k_b.expand(rows, -1, -1, -1), v_b.expand(rows, -1, -1, -1))
    if bias is not None and bias.ndim == 4 and bias.shape[0] == rows and rows > 1:
        bias = torch.cat([bias, bias])
    both = F.scaled_dot_product_attention(torch.cat([q, q]), torch.cat([k1, k2]), torch.cat([v1, v2]),
                                          attn_mask=bias, scale=scale)  # one call for both endpoints
    return torch.lerp(both[:rows], both[rows:], t)


def interpolated_attention_reference(q, k_a, v_a, k_b, v_b, t, *, mode="outer", k_self=None, v_self=None,
                                     scale=None) -> torch.Tensor:
    """``interpolated_attention`` written out in float64 with an explicit softmax, for tests."""
    q, k_a, v_a, k_b, v_b = (x.double() for x in (q, k_a, v_a, k_b, v_b))
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def attn(k, v):
        if k_self is not None:
            k = torch.cat([k_self.double(), k.expand(k_self.shape[0], -1, -1, -1)], dim=2)
            v = torch.cat([v_self.double(), v.expand(v_self.shape[0], -1, -1, -1)], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        return weights @ v

    if mode == "inner":
        return attn((1 - t) * k_a + t * k_b, (1 - t) * v_a + t * v_b)
    return (1 - t) * attn(k_a, v_a) + t * attn(k_b, v_b)


# -- Beta-distributed coefficients --------------------------------------------------------------------------
def beta_cdf(x, a, b, iterations: int = 300) -> torch.Tensor:
    """Regularised incomplete beta function I_x(a, b), float64, elementwise (broadcasts x, a, b).

    Continued fraction (modified Lentz), evaluated where it converges fast: for x < (a + 1) / (a + b + 2)
    directly, otherwise through the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    """
    x, a, b = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (x, a, b)))
    flip = x > (a + 1) / (a + b + 2)
    xx, aa, bb = torch.where(flip, 1 - x, x), torch.where(flip, b, a), torch.where(flip, a, b)
    tiny = 1e-300
    xs = xx.clamp(1e-300, 1.0)
    log_front = (torch.lgamma(aa + bb) - torch.lgamma(aa) - torch.lgamma(bb) + aa * torch.log(xs)
                 + bb * torch.log1p(-xs.clamp(max=1 - 1e-16)))
    c = torch.ones_like(xx)
    d = 1 - (aa + bb) * xx / (aa + 1)
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    d = 1 / d
    h = d.clone()
    for m in range(1, iterations + 1):
        for numerator in (m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                          -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):
            d = 1 + numerator * d
            d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1 + numerator / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            d = 1 / d
            h = h * d * c
        if m % 8 == 0 and float((d * c - 1).abs().max()) < 1e-15:  # converged everywhere
            break
    value = torch.exp(log_front) * h / aa
    value = torch.where(xx <= 0, torch.zeros_like(value), value)
    value = torch.where(flip, 1 - value, value)
    return value.clamp(0.0, 1.0)


def beta_quantiles(n: int, alpha: float, beta: float) -> list[float]:
    """``n`` coefficients: the Beta(alpha, beta) quantiles at i / (n - 1), endpoints exactly 0 and 1.

    With alpha = beta = 1 they are uniform; alpha = beta > 1 crowds frames around t = 0.5, where attention
    interpolation changes the image fastest (paper, Sec. 4.3). Quantiles by bracketing on ``beta_cdf`` grids.
    """
    if n < 2:
        raise ControlError(f"frames = {n}: an interpolation needs at least 2 frames (the two endpoints)")
    if not (alpha > 0 and beta > 0):
        raise ControlError(f"Beta coefficients need alpha > 0 and beta > 0, got alpha = {alpha}, beta = {beta}")
    if n == 2:
        return [0.0, 1.0]
    p = torch.tensor([i / (n - 1) for i in range(1, n - 1)], dtype=torch.float64)
    low, high = torch.zeros_like(p), torch.ones_like(p)
    for _ in range(3):  # bracket each quantile on a grid, three times: width 1 -> 1/1024^3
        grid = low[:, None] + (high - low)[:, None] * torch.linspace(0, 1, 1025, dtype=torch.float64)
        below = beta_cdf(grid, alpha, beta, iterations=200) < p[:, None]
        index = below.sum(dim=1).clamp(1, 1024)  # first grid point at or above p
        low = grid.gather(1, (index - 1)[:, None])[:, 0]
        high = grid.gather(1, index[:, None])[:, 0]
    return [0.0] + [float(v) for v in (low + high) / 2] + [1.0]


def fit_beta(t, cumulative, *, low: float = 0.2, high: float = 60.0) -> tuple[float, float]:
    """(alpha, beta) whose CDF best matches ``cumulative`` (normalised cumulative distance, 0 -> 1) at ``t``.

    If the perceptual path from A to B is parametrised by its normalised length C(t), frames at C(t_i) = i/(n-1)
    are evenly spaced; with C ~ Beta CDF those t_i are exactly ``beta_quantiles``. Least squares over a
    log-spaced grid of (alpha, beta) in [low, high], refined once around the best point.
    """
    t = torch.as_tensor(t, dtype=torch.float64).flatten()
    target = torch.as_tensor(cumulative, dtype=torch.float64).flatten()
    if t.numel() != target.numel() or t.numel() < 3:
        raise ControlError("fit_beta needs at least 3 matching (t, cumulative distance) points")
    lo, hi = math.log(low), math.log(high)
    best = (0.0, 0.0)
    for step in range(2):
        if step == 0:
            grid = torch.linspace(lo, hi, 41, dtype=torch.float64)
            ga, gb = grid, grid
        else:
            width = (hi - lo) / 40 * 1.5
            ga = torch.linspace(best[0] - width, best[0] + width, 21, dtype=torch.float64).clamp(lo, hi)
            gb = torch.linspace(best[1] - width, best[1] + width, 21, dtype=torch.float64).clamp(lo, hi)
        a, b = torch.meshgrid(ga.exp(), gb.exp(), indexing="ij")
        cdf = beta_cdf(t[None, None, :], a[..., None], b[..., None], iterations=150)
        error = ((cdf - target) ** 2).sum(-1)
        i, j = divmod(int(torch.argmin(error)), error.shape[1])
        best = (float(ga[i]), float(gb[j]))
    return math.exp(best[0]), math.exp(best[1])


def cumulative_distance(distances) -> list[float]:
    """Normalised cumulative sum of adjacent distances, starting at 0 and ending at 1 (uniform if all zero)."""
    total = float(sum(distances))
    if total <= 0:
        n = len(distances)
        return [i / n for i in range(n + 1)]
    out, acc = [0.0], 0.0
    for d in distances:
        acc += float(d)
        out.append(acc / total)
    return out


# -- latent interpolation -------------------------------------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor, t, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of one frame, over all their elements.

    a, b: same shape; t: float. t = 0 and t = 1 return ``a`` and ``b`` exactly; (almost) parallel inputs fall
    back to linear interpolation. Gaussian noise keeps its norm statistics under slerp (lerp shrinks it).
    """
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    x, y = a.double().flatten(), b.double().flatten()
    cos = torch.dot(x, y) / (x.norm() * y.norm()).clamp_min(eps)
    cos = cos.clamp(-1.0, 1.0)
    if float(cos.abs()) > 1 - 1e-6:
        return torch.lerp(a, b, t)
    theta = torch.arccos(cos)
    out = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


# -- distances and sequence metrics -------------------------------------------------------------------------
def to_tensor(image) -> torch.Tensor:
    """A PIL image or an (H, W, 3) uint8 array -> (3, H, W) float64 in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (3, H, W) -> CIELAB (D65), (3, H, W)."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype)
    xyz = torch.einsum("ij,jhw->ihw", matrix, linear)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype).reshape(3, 1, 1)
    r = xyz / white
    delta = 6 / 29
    f = torch.where(r > delta**3, r.clamp_min(1e-12) ** (1 / 3), r / (3 * delta**2) + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean CIE76 colour difference (Euclidean distance in Lab) over pixels; x, y: (3, H, W) sRGB in [0, 1]."""
    return float((rgb_to_lab(x) - rgb_to_lab(y)).norm(dim=0).mean())


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity of two (3, H, W) images in [0, 1] (Gaussian window, per channel, then mean).

    Wang et al. 2004 with C1 = (0.01)^2, C2 = (0.03)^2; the window is 7 px (11 in the paper) because frames may
    be as small as 64 px. Zero-padded borders are excluded ("valid" convolution).
    """
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window).to(x.dtype)

    def blur(z):
        return F.conv2d(z[None], kernel, groups=3)[0]

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(value.mean())


def _lpips():
    """An LPIPS model if the ``lpips`` package and its weights are installed; never downloads."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise ControlError("distance 'lpips' needs the lpips package with its weights installed locally (nothing "
                           "is downloaded); use distance 'lab' or 'ssim'") from None
    import lpips

    try:
        return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    except Exception as exc:  # weights missing: the package would try to fetch them
        raise ControlError(f"distance 'lpips': its weights are not available offline ({exc}); use 'lab' or "
                           "'ssim'") from None


DISTANCES = {
    "lab": "mean CIE76 colour difference in Lab (Delta E, 0-100+)",
    "ssim": "1 - SSIM (7 px Gaussian window)",
    "lpips": "LPIPS (AlexNet), only with locally installed weights",
}


def frame_distances(images, distance: str = "lab") -> list[float]:
    """Distances between adjacent frames (len(images) - 1 values), by ``distance`` (see ``DISTANCES``)."""
    if distance not in DISTANCES:
        raise ControlError(f"unknown distance {distance!r}; allowed: {', '.join(DISTANCES)}")
    tensors = [to_tensor(im) for im in images]
    if distance == "lpips":
        model = _lpips()
        with torch.no_grad():
            return [float(model(a[None].float() * 2 - 1, b[None].float() * 2 - 1))
                    for a, b in zip(tensors, tensors[1:])]
    if distance == "ssim":
        return [1.0 - ssim(a, b) for a, b in zip(tensors, tensors[1:])]
    return [lab_distance(a, b) for a, b in zip(tensors, tensors[1:])]


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, towards 1 = one value holds everything."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < 2 or mean <= 0:
        return 0.0
    total = sum(abs(a - b) for a in values for b in values)
    return total / (2 * n * n * mean)


def smoothness(distances) -> float:
    """1 - Gini of the adjacent distances (paper, Sec. 5.1): 1 = every step equally large."""
    return 1.0 - gini(distances)


def consistency(distances) -> float:
    """Mean adjacent distance (paper, Sec. 5.1): lower = frames closer to their neighbours."""
    return float(sum(distances) / len(distances)) if len(distances) else 0.0


# -- outputs -------------------------------------------------------------------------------------------------
def contact_strip(images, gap: int = 2, background=(255, 255, 255)):
    """The frames side by side in one PIL image, ``gap`` pixels apart."""
    from PIL import Image

    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    strip = Image.new("RGB", (width, height), background)
    x = 0
    for im in images:
        strip.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return strip


def gif_bytes(images, seconds_per_frame: float = 0.15, bounce: bool = True) -> bytes:
    """An animated GIF of the frames (looping; ``bounce`` plays them forward then back)."""
    frames = [im.convert("RGB") for im in images]
    if bounce and len(frames) > 2:
        frames = frames + frames[-2:0:-1]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=max(20, int(seconds_per_frame * 1000)), disposal=2)
    return buffer.getvalue()
