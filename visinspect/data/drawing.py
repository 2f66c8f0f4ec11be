"""Drawing the synthetic products: three textures and three objects, each with three defect types
whose masks are exact (a defect changes only the pixels its mask marks), one image per seed.

`render_sample` draws one image of a category; `draw_defect` draws one of the defects on any
image (pseudo-defects of real products). `synthetic` writes whole datasets of them to disk.
"""


from collections.abc import Callable, Sequence

import cv2
import numpy as np

from visinspect.errors import DataError, VisinspectError

TEXTURES: tuple[str, ...] = ("grain_wood", "grain_leather", "woven_fabric")
OBJECTS: tuple[str, ...] = ("round_pill", "bottle_top", "hex_nut")
# Names are deliberately not MVTec AD's, so a synthetic root can sit next to a real one.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "grain_wood": ("crack", "hole", "scratch"),
    "grain_leather": ("hole", "scratch", "stain"),
    "woven_fabric": ("contamination", "hole", "stain"),
    "round_pill": ("contamination", "crack", "stain"),
    "bottle_top": ("contamination", "crack", "scratch"),
    "hex_nut": ("crack", "scratch", "stain"),
}

Image = np.ndarray  # float32 H×W×3 RGB in [0, 1] while drawing
Defect = tuple[np.ndarray, Image]  # (alpha H×W, target image): the image becomes target at alpha 1
_AREA_RANGE = (0.008, 0.08)  # a defect covers this fraction of the image
_MIN_ALPHA = 0.12  # weaker blending is dropped so every masked pixel visibly changes


# ---------------------------------------------------------------------------------------------
# drawing helpers; coordinates are normalised to [-1, 1] so shapes scale with the image size


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [-1, 1]; one pixel is 2 / n units."""
    c = ((np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
    return np.meshgrid(c, c, indexing="ij")


def _noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth value noise (zero mean, unit std) of size×size from a coarse (rows, cols) grid."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _sample(field: np.ndarray, u: np.ndarray, v: np.ndarray, extent: float = 1.5) -> np.ndarray:
    """Read `field` (covering [-extent, extent]², cols = u, rows = v) at rotated coordinates."""
    scale = field.shape[0] / (2 * extent)
    map_x = ((u + extent) * scale - 0.5).astype(np.float32)
    map_y = ((v + extent) * scale - 0.5).astype(np.float32)
    return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _rotate(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) in a frame rotated by `angle` radians."""
    c, s = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep float32 arrays float32
    return xx * c + yy * s, -xx * s + yy * c


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _coverage(signed: np.ndarray, n: int) -> np.ndarray:
    """Anti-aliased coverage of the region where `signed` (a distance in units) is positive."""
    return np.clip(signed * (n / 2.0) + 0.5, 0.0, 1.0)


def _jitter(rng: np.random.Generator, colour: Sequence[float], sd: float = 0.04) -> np.ndarray:
    """A base colour with a small per-image tint, so good images are not all identical."""
    return np.asarray(colour, np.float32) * np.exp(rng.normal(0.0, sd, 3)).astype(np.float32)


def _paint(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> Image:
    """Blend two RGB colours or images per pixel by weight map t (0 → a, 1 → b)."""
    return a + (b - a) * t[..., None]


# ---------------------------------------------------------------------------------------------
# scenes: each returns (image, foreground coverage); all draws come from the scene stream


def _wood(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    yy, xx = _grid(n)
    u, v = _rotate(yy, xx, rng.uniform(-0.4, 0.4))  # u runs along the grain
    f = 3 * n // 2
    warp = _sample(_noise(rng, f, (3, 4)), u, v)
    spacing = _sample(_noise(rng, f, (10, 2)), u, v)  # growth rings are unevenly spaced
    bow = rng.uniform(-0.3, 0.3) * (u - rng.uniform(-1, 1)) ** 2  # flat-sawn arches
    rings = (v + 0.03 * warp + bow) * rng.uniform(4.0, 7.0) + 0.35 * spacing + rng.uniform()
    phase = rings - np.floor(rings)
    late = phase**3 + np.exp(-(((phase - 0.92) / 0.08) ** 2))  # darkening, then a thin line
    fibre = _sample(_noise(rng, f, (max(n, 16), 5)), u, v)
    zones = _sample(_noise(rng, f, (5, 2)), u, v)
    t = np.clip(0.45 * late + 0.1 * fibre + 0.08 * zones + 0.2, 0, 1)
    tint = _jitter(rng, (1.0, 1.0, 1.0), 0.03)  # one tint for both, so the hue stays woody
    img = _paint(tint * (0.82, 0.63, 0.43), tint * (0.45, 0.27, 0.14), t)
    return img, np.ones((n, n), np.float32)


def _leather(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    # Cellular grain: distance to the nearest and second-nearest of jittered grid points.
    cell = max(n / rng.uniform(20, 28), 3.0)
    m = int(np.ceil(n / cell)) + 2
    pts = (np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij"), -1)
           + rng.uniform(0.1, 0.9, (m, m, 2)) - 1) * cell
    stretch = rng.uniform(0.85, 1.15)  # slight anisotropy changes the grain's "pose"
    py, px = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5, indexing="ij")
    iy, ix = (py // cell).astype(int) + 1, (px // cell).astype(int) + 1
    d = np.stack([np.hypot((pts[iy + dy, ix + dx, 0] - py) * stretch,
                           pts[iy + dy, ix + dx, 1] - px)
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    d.sort(axis=0)
    crease = 1 - _smoothstep(0.0, 0.35 * cell, d[1] - d[0])
    bulge = np.clip(1 - d[0] / cell, 0, 1)
    depth = 0.75 + 0.25 * np.clip(_noise(rng, n, (5, 5)), -1, 1)  # creases deeper in places
    fine = _noise(rng, n, (n // 2, n // 2))
    folds = _noise(rng, n, (3, 3))
    shade = 0.68 + 0.12 * bulge - 0.3 * crease * depth + 0.04 * fine + 0.04 * folds
    shade = cv2.GaussianBlur(shade.astype(np.float32), (0, 0), 0.6)
    base = _jitter(rng, (0.50, 0.33, 0.21), 0.03)
    return (base * shade[..., None]).astype(np.float32), np.ones((n, n), np.float32)


def _fabric(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    m = 2 * n  # drawn at twice the size, then reduced: fine threads would alias into moiré
    yy, xx = _grid(m)
    u, v = _rotate(yy, xx, rng.uniform(-0.2, 0.2))
    wobble = _noise(rng, m, (4, 4)) * 0.01
    period = rng.uniform(7, 9) * 2 / max(n, 80)  # threads stay visible on small images
    gu = (u + wobble) / period
    gv = (v - wobble) / (period * rng.uniform(0.7, 0.85))  # weft threads lie closer together
    iu, iv = np.floor(gu).astype(int), np.floor(gv).astype(int)
    fu, fv = gu - iu, gv - iv
    warp_on_top = (iu + iv) % 2 == 0  # plain weave: over one, under one
    # Each float is a rounded bump: full across the thread, sinking at both ends.
    warp_h = np.sin(np.pi * fu) ** 0.8 * np.sin(np.pi * fv) ** 0.3
    weft_h = np.sin(np.pi * fv) ** 0.8 * np.sin(np.pi * fu) ** 0.3
    height = np.where(warp_on_top, warp_h, weft_h).astype(np.float32)
    light = _light(rng)
    relief = (cv2.Sobel(height, cv2.CV_32F, 1, 0) * light[0]
              + cv2.Sobel(height, cv2.CV_32F, 0, 1) * light[1])  # bumps lit from one side
    # Each thread is a little lighter or darker than its neighbours, and hairy along its length.
    thread = rng.normal(0.0, 0.05, (2, 64)).astype(np.float32)
    gain = np.where(warp_on_top, thread[0][iu % 64], thread[1][iv % 64])
    hair_u = _sample(_noise(rng, 3 * n // 2, (4, n)), u, v)  # streaks along u
    hair_v = _sample(_noise(rng, 3 * n // 2, (n, 4)), u, v)
    hair = np.where(warp_on_top, hair_v, hair_u) * 0.06
    warp_c, weft_c = _jitter(rng, (0.42, 0.48, 0.60), 0.03), _jitter(rng, (0.52, 0.55, 0.62), 0.03)
    colour = np.where(warp_on_top[..., None], warp_c, weft_c)
    img = colour * (0.45 + 0.5 * height + 0.16 * relief + gain + hair)[..., None]
    img = cv2.resize(img.astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)
    return img, np.ones((n, n), np.float32)


def _backdrop(rng: np.random.Generator, n: int, colour: Sequence[float]) -> Image:
    """A matte surface with faint blotches for the objects to lie on."""
    blotch = 1 + 0.04 * _noise(rng, n, (4, 4)) + 0.02 * _noise(rng, n, (n // 4, n // 4))
    return _jitter(rng, colour, 0.03) * blotch[..., None]


def _shadow(img: Image, cover: np.ndarray, n: int, light: np.ndarray, depth: float) -> Image:
    """Darken the backdrop under a blurred copy of the object shifted away from the light."""
    shift = np.float32([[1, 0, -light[0] * n * 0.04], [0, 1, -light[1] * n * 0.04]])
    soft = cv2.warpAffine(cover, shift, (n, n))
    soft = cv2.GaussianBlur(soft, (0, 0), n * 0.03)
    return img * (1 - depth * soft)[..., None]


def _light(rng: np.random.Generator) -> np.ndarray:
    """A unit light direction (x, y, z) from above, at a random azimuth."""
    az, el = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.2)
    return np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)], np.float32)


def _pill(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    yy, xx = _grid(n)
    cy, cx = rng.uniform(-0.12, 0.12, 2)
    a = rng.uniform(0.48, 0.56)
    b = a * rng.uniform(0.82, 0.95)
    angle = rng.uniform(0, np.pi)
    u, v = _rotate(yy - cy, xx - cx, angle)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    cover = _coverage((1 - r) * b, n)
    # Shallow dome: normals of an ellipsoid, lit from a random side.
    z = np.sqrt(np.clip(1 - r**2, 0.02, 1)) * 0.25
    normal = np.stack([u / a**2, v / b**2, z / 0.25**2], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = _light(rng)
    lu, lv = _rotate(light[1], light[0], angle)
    diffuse = np.clip(normal @ np.array([lu, lv, light[2]], np.float32), 0, 1)
    groove = np.exp(-((u / (0.012 * max(128 / n, 1))) ** 2)) * (r < 0.85)  # score line
    shade = 0.45 + 0.55 * diffuse - 0.22 * groove + 0.02 * _noise(rng, n, (n // 3, n // 3))
    pill = _jitter(rng, (0.93, 0.89, 0.80), 0.015) * shade[..., None]
    back = _shadow(_backdrop(rng, n, (0.17, 0.18, 0.21)), cover, n, light, 0.5)
    return _paint(back, pill, cover).astype(np.float32), cover


def _bottle(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    yy, xx = _grid(n)
    cy, cx = rng.uniform(-0.06, 0.06, 2)
    radius = rng.uniform(0.78, 0.86)
    rho = np.hypot(yy - cy, xx - cx) / radius
    theta = np.arctan2(yy - cy, xx - cx)
    light = _light(rng)
    glint = 1 + 0.55 * np.cos(theta - np.arctan2(light[1], light[0]))
    outer = np.sin(np.pi * np.clip((rho - 0.8) / 0.2, 0, 1)) ** 0.7  # rounded outer lip
    inner = np.sin(np.pi * np.clip((rho - 0.42) / 0.14, 0, 1)) ** 0.7  # rim of the opening
    slope = np.clip((rho - 0.55) / 0.25, 0, 1) * (rho < 0.8)  # shoulder falling inwards
    seam_angle = rng.uniform(-np.pi, np.pi)  # mould seam: makes the rotation visible
    seam = np.exp(-((np.angle(np.exp(1j * (theta - seam_angle))) * rho * radius * n / 2) ** 2))
    seam = seam * (rho > 0.58)
    shade = (0.35 + 0.5 * outer * glint + 0.35 * inner * glint + 0.25 * slope
             + 0.15 * seam + 0.03 * _noise(rng, n, (n // 4, n // 4)))
    glass = _jitter(rng, (0.55, 0.40, 0.22), 0.05) * shade[..., None]
    depth = np.clip(rho / 0.44, 0, 1) ** 2  # the bottle's dark inside, lighter at the bottom
    inside = _jitter(rng, (0.10, 0.08, 0.06)) * (1.4 - depth)[..., None]
    glass = _paint(glass, inside, _coverage((0.44 - rho) * radius, n))
    cover = _coverage((1 - rho) * radius, n)
    back = _backdrop(rng, n, (0.07, 0.07, 0.08))
    return _paint(back, glass, cover).astype(np.float32), cover


def _nut(rng: np.random.Generator, n: int) -> tuple[Image, np.ndarray]:
    yy, xx = _grid(n)
    cy, cx = rng.uniform(-0.1, 0.1, 2)
    radius = rng.uniform(0.62, 0.72)
    sides = rng.uniform(0, np.pi / 3) + np.pi / 3 * np.arange(3, dtype=np.float32)[:, None, None]
    dy, dx = yy - cy, xx - cx
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    flat = np.abs(dx * np.cos(sides) + dy * np.sin(sides)).max(0)  # hexagon "radius" along flats
    apothem, chamfer, bore = radius * np.cos(np.pi / 6), radius * 0.96, radius * 0.42
    cover = (_coverage(apothem - flat, n) * _coverage(chamfer - rho, n)
             * _coverage(rho - bore, n))
    light = _light(rng)
    facing = np.cos(theta - np.arctan2(light[1], light[0]))
    corner = _smoothstep(0.88, 0.9, rho / radius)  # the chamfer cone shows at the corners
    sink = 1 - np.clip((rho - bore) / (0.14 * radius), 0, 1)  # countersunk, threaded bore
    thread = sink * (0.5 + 0.5 * np.sin(2 * np.pi * rho / (0.04 * radius) + theta))
    lathe = np.interp(rho / radius, np.linspace(0, 1, 200), rng.normal(0, 1, 200))  # turning marks
    face = 0.74 + 0.03 * lathe + 0.08 * facing * (rho / radius)
    shade = (face * (1 - corner) + (0.55 + 0.3 * facing) * corner
             - 0.25 * sink * (1 + 0.6 * facing) - 0.12 * thread)
    steel = _jitter(rng, (0.74, 0.75, 0.78), 0.02) * shade[..., None]
    back = _shadow(_backdrop(rng, n, (0.28, 0.32, 0.38)), cover, n, light, 0.45)
    return _paint(back, steel, cover).astype(np.float32), cover


_SCENES: dict[str, Callable[[np.random.Generator, int], tuple[Image, np.ndarray]]] = {
    "grain_wood": _wood,
    "grain_leather": _leather,
    "woven_fabric": _fabric,
    "round_pill": _pill,
    "bottle_top": _bottle,
    "hex_nut": _nut,
}


# ---------------------------------------------------------------------------------------------
# defects: each returns a Defect, drawn from the defect stream only


def _place(rng: np.random.Generator, cover: np.ndarray, margin: float) -> np.ndarray:
    """A random point (y, x) in units at least `margin` units inside the foreground."""
    n = cover.shape[0]
    k = 2 * int(margin * n / 2) + 1
    inner = cv2.erode((cover > 0.99).astype(np.uint8), np.ones((k, k), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    idx = np.flatnonzero(inner)
    if idx.size == 0:  # tiny images: fall back to anywhere on the foreground
        idx = np.flatnonzero(cover > 0.5)
    y, x = divmod(int(idx[rng.integers(idx.size)]), n)
    return (np.array([y, x], np.float32) + 0.5) * (2.0 / n) - 1.0


def _blob(rng: np.random.Generator, n: int, centre: np.ndarray, radius: float,
          rough: float = 0.25) -> np.ndarray:
    """Coverage of an irregular, slightly elongated blob."""
    yy, xx = _grid(n)
    u, v = _rotate(yy - centre[0], xx - centre[1], rng.uniform(0, np.pi))
    v = v / rng.uniform(0.6, 1.0)
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    k = np.arange(2, 7, dtype=np.float32)[:, None, None]
    wobble = rng.uniform(0, rough, (5, 1, 1)) / k * 2
    edge = radius * (1 + (wobble * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (5, 1, 1))))
                     .sum(0))
    return _coverage(edge - rho, n)


def _strokes(n: int, paths: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Coverage of polylines ((m, 2) points (y, x) in units, width in pixels), 4× supersampled."""
    s = 4
    canvas = np.zeros((n * s, n * s), np.uint8)
    for points, width in paths:
        xy = np.round((points[:, ::-1] + 1) * (n * s / 2)).astype(np.int32)
        cv2.polylines(canvas, [xy], False, 255, thickness=max(1, round(width * s)))
    return cv2.resize(canvas, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int,
          step: float, turn: float) -> np.ndarray:
    """A jagged path: `steps` straight segments whose heading drifts randomly."""
    headings = heading + np.cumsum(rng.normal(0, turn, steps))
    moves = step * np.stack([np.sin(headings), np.cos(headings)], -1)
    return np.vstack([start, start + np.cumsum(moves, 0)]).astype(np.float32)


def _scratch(rng: np.random.Generator, img: Image, cover: np.ndarray) -> Defect:
    n = img.shape[0]
    centre, length = _place(rng, cover, 0.2), rng.uniform(0.5, 1.2)
    t = np.linspace(-0.5, 0.5, 17, dtype=np.float32)[:, None] * length
    heading = rng.uniform(0, np.pi)
    along = np.array([np.sin(heading), np.cos(heading)], np.float32)
    across = np.array([along[1], -along[0]])
    points = centre + t * along + rng.uniform(-0.4, 0.4) * t**2 * across  # a gentle arc
    width = max(1.2, rng.uniform(2.0, 4.0) * n / 128)
    alpha = _strokes(n, [(points, width)]) * rng.uniform(0.7, 0.95)
    return alpha, np.clip(img * 1.2 + 0.1, 0, 1)  # the scratched surface is lighter


def _crack(rng: np.random.Generator, img: Image, cover: np.ndarray) -> Defect:
    n = img.shape[0]
    start, heading = _place(rng, cover, 0.25), rng.uniform(0, 2 * np.pi)
    step, width = rng.uniform(0.05, 0.09), max(1.2, rng.uniform(2.0, 3.5) * n / 128)
    halves = [_walk(rng, start, heading + h, int(rng.integers(3, 7)), step, 0.35)
              for h in (0, np.pi)]
    main = np.vstack([halves[0][::-1], halves[1][1:]])
    paths = [(main, width)]
    for node in rng.choice(len(main), size=int(rng.integers(1, 3)), replace=False):
        branch = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        paths.append((_walk(rng, main[node], branch, int(rng.integers(2, 4)), step * 0.8, 0.5),
                      max(1.0, width * 0.6)))
    return _strokes(n, paths), img * rng.uniform(0.3, 0.5)


def _hole(rng: np.random.Generator, img: Image, cover: np.ndarray) -> Defect:
    n = img.shape[0]
    centre, radius = _place(rng, cover, 0.25), rng.uniform(0.12, 0.32)
    yy, xx = _grid(n)
    side = rng.uniform(0, 2 * np.pi)  # the hole's wall casts a shadow on one side
    wall = np.clip(0.5 + ((yy - centre[0]) * np.sin(side) + (xx - centre[1]) * np.cos(side))
                   / (2 * radius), 0, 1)
    dark = img.mean((0, 1)) * rng.uniform(0.2, 0.35)
    return _blob(rng, n, centre, radius, 0.35), dark * (0.6 + 0.8 * wall)[..., None]


def _stain(rng: np.random.Generator, img: Image, cover: np.ndarray) -> Defect:
    n = img.shape[0]
    centre, radius = _place(rng, cover, 0.2), rng.uniform(0.14, 0.34)
    patchy = 0.75 + 0.25 * np.clip(_noise(rng, n, (6, 6)), -1, 1)
    alpha = _blob(rng, n, centre, radius, 0.3) * patchy * rng.uniform(0.5, 0.8)
    tint = np.exp(rng.normal(0, 0.25, 3)).astype(np.float32)
    tint *= rng.uniform(0.6, 0.9) / tint.mean()  # a discoloured spot, a little darker
    return alpha, np.clip(img * tint, 0, 1)


def _contamination(rng: np.random.Generator, img: Image, cover: np.ndarray) -> Defect:
    n = img.shape[0]
    centre = _place(rng, cover, 0.25)
    spread = rng.uniform(0.05, 0.12)
    specks = [_blob(rng, n, centre + rng.normal(0, spread, 2), rng.uniform(0.03, 0.1), 0.4)
              for _ in range(int(rng.integers(3, 10)))]
    alpha = np.max(specks, axis=0) * rng.uniform(0.8, 0.95)
    # Foreign matter in a hue near the product's own, so colour alone does not give it away.
    foreign = img.mean((0, 1)) * np.exp(rng.normal(0, 0.35, 3)) * rng.uniform(0.35, 0.9)
    grit = 1 + 0.1 * _noise(rng, n, (n // 4, n // 4))
    return alpha, np.clip(foreign * grit[..., None], 0, 1).astype(np.float32)


_DEFECTS: dict[str, Callable[[np.random.Generator, Image, np.ndarray], Defect]] = {
    "contamination": _contamination,
    "crack": _crack,
    "hole": _hole,
    "scratch": _scratch,
    "stain": _stain,
}


def _defect(rng: np.random.Generator, kind: str, img: Image, cover: np.ndarray) -> Defect:
    """Draw a defect until its area is in range; alpha is exactly zero outside the mask."""
    n = img.shape[0]
    for _ in range(20):
        alpha, target = _DEFECTS[kind](rng, img, cover)
        alpha = alpha * cover  # objects: defects stay on the object
        alpha[alpha < _MIN_ALPHA] = 0
        if _AREA_RANGE[0] <= np.count_nonzero(alpha) / n**2 <= _AREA_RANGE[1]:
            break
    return alpha, target


# ---------------------------------------------------------------------------------------------
# public API


DEFECT_KINDS = tuple(_DEFECTS)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the synthetic dataset's defects drawn on any square RGB uint8 image (anywhere on it):
    (the image with the defect, its bool mask). Used to make pseudo-defects of real products."""
    if kind not in _DEFECTS:
        raise DataError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
        raise DataError(f"draw_defect needs a square RGB uint8 image; got {image.dtype} {image.shape}")
    img = image.astype(np.float32) / 255
    cover = np.ones(img.shape[:2], np.float32)
    alpha, target = _defect(rng, kind, img, cover)
    mask = alpha > 0
    out = np.where(mask[..., None], _paint(img, target, alpha), img)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8), mask


def check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise DataError(f"unknown synthetic category {category!r}; known: {', '.join(CATEGORIES)}")


def check_seed_and_size(seed: int, image_size: int) -> None:
    if int(seed) < 0:
        raise VisinspectError(f"seed must be a non-negative integer, got {seed}")
    if int(image_size) < 32:
        raise VisinspectError(f"image_size must be at least 32 pixels, got {image_size}")


def render_sample(category: str, defect_type: str | None, seed: int,
                  image_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: (RGB uint8 H×W×3, bool H×W defect mask, all False if defect_type is None).

    The scene and the defect use separate random streams of `seed`, so the same seed with
    defect_type=None is the exact defect-free version of the same image.
    """
    check_category(category)
    if defect_type is not None and defect_type not in CATEGORIES[category]:
        raise DataError(f"unknown defect type {defect_type!r} for {category!r}; "
                        f"known: {', '.join(CATEGORIES[category])}")
    check_seed_and_size(seed, image_size)
    n = int(image_size)
    scene_seq, defect_seq = np.random.SeedSequence(int(seed)).spawn(2)
    scene_rng = np.random.default_rng(scene_seq)
    img, cover = _SCENES[category](scene_rng, n)
    # Lighting and sensor noise are drawn now but applied per pixel after the defect, so the
    # defect is lit like the rest and pixels outside its mask stay bit-identical.
    yy, xx = _grid(n)
    slope = scene_rng.normal(0, 0.1, 2)
    gain = scene_rng.uniform(0.85, 1.12) * (1 + slope[0] * yy + slope[1] * xx)
    white = np.exp(scene_rng.normal(0, 0.008, 3)).astype(np.float32)
    grain = scene_rng.normal(0, 0.012, (n, n, 3)).astype(np.float32)
    mask = np.zeros((n, n), bool)
    if defect_type is not None:
        alpha, target = _defect(np.random.default_rng(defect_seq), defect_type, img, cover)
        mask = alpha > 0
        img = np.where(mask[..., None], _paint(img, target, alpha), img)
    out = np.clip(img * gain[..., None] * white + grain, 0, 1)
    return np.round(out * 255).astype(np.uint8), mask
