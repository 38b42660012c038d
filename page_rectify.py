"""Find the paper in a photo of a printed ECG page and undo its perspective: the page frame at a known scale.

    python page_rectify.py photo.jpg ... --out DIR          # DIR/{stem}.png + DIR/{stem}.json
    python page_rectify.py photo.jpg --out DIR --show       # also DIR/{stem}_corners.png: the outline found

The paper is the largest bright, unsaturated region (desks are darker or coloured, paper is white in shade
too); its outline's convex hull is simplified to a quadrilateral, each side refitted to the outline it
follows (cv2.fitLine), and a homography maps the corners where those sides meet onto a letter page in
landscape (11 x 8.5 in) at PX_PER_MM. Where the paper runs out of view, the sides seen meet beyond the frame
and carry the page there (`on_frame`: the share of the outline that is the frame's); a side not seen at all
stays the frame's edge, a stretch that reading the grid's own scale forgives. A scan or render that is all
paper already (the paper fills the frame, or its corners are the frame's) comes back untouched: the same
array, with why in `action`. This undoes one plane; page_flatten then takes out folds and curl on the page's grid.
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

import ecg_cli
import page_image
from ecg_page import PAGE_H_IN, PAGE_W_IN

PX_PER_MM = 8.0                 # output scale: a letter page is 2235 x 1727 px, the grid's 1 mm is 8 px
DETECT_SIDE = 1000              # px: the outline is found on a copy this long, then scaled back
CLOSE_MM_SHARE = 0.012          # closing kernel over the copy's long side: fills grid lines, traces, text
MIN_PAPER_SHARE = 0.2           # a bright region smaller than this share of the frame is not the page
FILLS_FRAME_SHARE = 0.92        # paper over this share of the frame: a scan or render, nothing to undo
CORNER_NEAR_SHARE = 0.03        # corners within this share of the diagonal of the frame's: already flat
FRAME_TOUCH_PX = 3              # outline points this near the copy's edge lie on the frame, not the paper
SIDE_NEAR_SHARE = 0.02          # outline points this near a quad side (share of the diagonal) belong to it
MIN_SIDE_POINTS = 30            # fewer points off the frame than this: the side is not seen, keep the quad's
EDGE_PROBE_SHARE = 0.015        # the paper's edge is probed this share of the diagonal inside and outside it
MIN_EDGE_CONTRAST = 40.0        # paperness levels the page must stand above what lies outside its seen sides
MAX_FIT_SHARE = 0.02            # mean outline-to-quad distance over the diagonal above this: not a quad
OUTLINE_RECTIFIED = (0, 200, 0)   # RGB of the outline drawn on a photo whose page was rectified
OUTLINE_UNTOUCHED = (255, 0, 0)   # ... and of one left as it was


@dataclass
class Rectified:
    """What rectify found and did. rgb: the page (the input array itself when untouched); corners: the
    paper's corners in the source image (x, y px; top-left, top-right, bottom-right, bottom-left), None
    where no page outline was found; homography: source -> rgb (3 x 3), None when untouched; action:
    'rectified' or 'untouched: why'; fit_px: mean distance from the paper's outline to the quadrilateral, in
    source px (small: a flat, straight-edged sheet); paper_share: the paper's share of the source frame;
    on_frame: the share of the paper's outline on the image's edge (the paper runs out of view there);
    edge_contrast: how much the paper stands out from what lies outside its sides (edge_contrast)."""
    rgb: np.ndarray
    action: str
    corners: np.ndarray = None
    homography: np.ndarray = None
    fit_px: float = float('nan')
    paper_share: float = float('nan')
    on_frame: float = float('nan')
    edge_contrast: float = float('nan')
    px_per_mm: float = float('nan')
    size_wh: tuple = field(default=None)

    def summary(self):
        """The JSON-ready facts (all but the pixels)."""
        listed = (lambda a: None if a is None else np.round(a, 4).tolist())
        return {'action': self.action, 'corners_xy': listed(self.corners), 'homography': listed(self.homography),
                'fit_px': round(float(self.fit_px), 2), 'paper_share': round(float(self.paper_share), 4),
                'on_frame': round(float(self.on_frame), 4), 'edge_contrast': round(float(self.edge_contrast), 1),
                'px_per_mm': self.px_per_mm, 'size_wh': self.size_wh}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Find the paper in ECG photos and undo the perspective.')
    parser.add_argument('images', nargs='+', type=Path, help='photos or scans of ECG pages')
    parser.add_argument('--out', required=True, type=Path, help='folder for {stem}.png and {stem}.json')
    parser.add_argument('--px_per_mm', type=float, default=PX_PER_MM, help=f'output scale (default {PX_PER_MM:g})')
    parser.add_argument('--show', action='store_true', help='also {stem}_corners.png: the outline on the photo')
    return parser.parse_args(argv)


def paperness(small):
    """(h, w, 3) uint8 RGB -> (h, w) uint8: how paper-like each pixel is, bright and unsaturated (V - S)."""
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.int16)
    return cv2.GaussianBlur(np.clip(hsv[..., 2] - hsv[..., 1], 0, 255).astype(np.uint8), (5, 5), 0)


def paper_mask(paper):
    """(h, w) uint8 paperness -> (h, w) uint8 mask of paper, split from the desk by Otsu; grid lines, traces
    and text closed over, specks opened away."""
    _, mask = cv2.threshold(paper, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    side = max(3, int(CLOSE_MM_SHARE * max(paper.shape[:2])) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)


def largest_outline(mask):
    """The outer contour of the mask's largest region, (n, 2) int x, y; None on an empty mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return max(contours, key=cv2.contourArea)[:, 0] if contours else None


def quad_of(outline):
    """The convex hull of an outline simplified to 4 corners (growing tolerance), (4, 2) float; None where
    no tolerance gives exactly 4."""
    hull = cv2.convexHull(outline.reshape(-1, 1, 2))
    perimeter = cv2.arcLength(hull, True)
    for share in np.arange(0.005, 0.1, 0.005):
        corners = cv2.approxPolyDP(hull, share * perimeter, True)
        if len(corners) == 4:
            return corners[:, 0].astype(np.float64)
        if len(corners) < 4:
            return None
    return None


def order_corners(corners):
    """4 corners in any order -> top-left, top-right, bottom-right, bottom-left (pages turned < 45 deg)."""
    s, d = corners.sum(1), corners[:, 1] - corners[:, 0]
    return corners[[np.argmin(s), np.argmin(d), np.argmax(s), np.argmax(d)]]


def side_lines(outline, corners, shape_hw):
    """Each quad side (TL-TR, TR-BR, BR-BL, BL-TL) refitted to the outline points near it that are not on
    the image's edge: [(point, direction) or None where the side is out of view]."""
    h, w = shape_hw
    x, y = outline[:, 0], outline[:, 1]
    seen = (x > FRAME_TOUCH_PX) & (y > FRAME_TOUCH_PX) & (x < w - 1 - FRAME_TOUCH_PX) & (y < h - 1 - FRAME_TOUCH_PX)
    lines = []
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        direction = (b - a) / np.linalg.norm(b - a)
        offset = outline - a
        along = offset @ direction
        across = np.abs(offset[:, 0] * direction[1] - offset[:, 1] * direction[0])
        near = seen & (across < SIDE_NEAR_SHARE * np.hypot(h, w)) & (along > 0) & (along < np.linalg.norm(b - a))
        if near.sum() < MIN_SIDE_POINTS:
            lines.append(None)
            continue
        vx, vy, x0, y0 = cv2.fitLine(outline[near].astype(np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
        lines.append((np.array([x0, y0]), np.array([vx, vy])))
    return lines


def refined_corners(outline, corners, shape_hw):
    """The corners where the refitted sides meet, also outside the image where the paper runs out of view
    (the sides seen carry the perspective past the frame); a corner next to an unseen side stays the quad's."""
    lines = side_lines(outline, corners, shape_hw)
    refined = corners.copy()
    for k in range(4):   # corner k joins side k-1 (ending there) and side k (starting there)
        before, after = lines[k - 1], lines[k]
        if before is None or after is None:
            continue
        matrix = np.column_stack([before[1], -after[1]])
        if abs(np.linalg.det(matrix)) < 1e-6:
            continue
        t = np.linalg.solve(matrix, after[0] - before[0])
        refined[k] = before[0] + t[0] * before[1]
    return refined


def fit_px(outline, corners):
    """Mean distance (px) from the outline's points to the quadrilateral's edges."""
    quad = corners.reshape(-1, 1, 2).astype(np.float32)
    points = outline[::max(1, len(outline) // 2000)].astype(np.float32)
    return float(np.mean([abs(cv2.pointPolygonTest(quad, (float(x), float(y)), True)) for x, y in points]))


def on_frame_share(outline, shape_hw):
    """Share of the outline's points that lie on the image's edge (the paper runs out of view there)."""
    h, w = shape_hw
    x, y = outline[:, 0], outline[:, 1]
    near = (x <= FRAME_TOUCH_PX) | (y <= FRAME_TOUCH_PX) | (x >= w - 1 - FRAME_TOUCH_PX) | (y >= h - 1 - FRAME_TOUCH_PX)
    return float(near.mean())


def edge_contrast(paper, corners):
    """Median, over the quad's sides seen in the image, of how much more paper-like (paperness levels) the
    page is just inside the side than what lies just outside it; NaN where no side is seen. A sheet on a desk
    stands out by 100-200; a page whose light merely changes (a stain, a shadow on coloured paper) by a few."""
    h, w = paper.shape
    reach = EDGE_PROBE_SHARE * np.hypot(h, w)
    centre, steps = corners.mean(0), np.linspace(0.1, 0.9, 41)[:, None]
    contrasts = []
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        points = a + steps * (b - a)
        normal = np.array([a[1] - b[1], b[0] - a[0]]) / np.linalg.norm(b - a)
        normal = normal if np.dot(centre - points.mean(0), normal) > 0 else -normal
        inside, outside = np.rint(points + reach * normal).astype(int), np.rint(points - reach * normal).astype(int)
        seen = ((outside >= 0) & (outside < [w, h])).all(1) & ((inside >= 0) & (inside < [w, h])).all(1)
        if seen.sum() >= len(steps) // 4:
            inner, outer = paper[inside[seen, 1], inside[seen, 0]], paper[outside[seen, 1], outside[seen, 0]]
            contrasts.append(float(np.median(inner.astype(np.int16) - outer)))
    return float(np.median(contrasts)) if contrasts else float('nan')


def already_flat(corners, shape_hw, paper_share):
    """Why the page needs no rectifying (it is all paper, or its corners are the frame's), or None."""
    h, w = shape_hw
    if paper_share >= FILLS_FRAME_SHARE:
        return f'the paper fills {100 * paper_share:.0f} % of the frame'
    frame = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
    if np.abs(corners - frame).max() <= CORNER_NEAR_SHARE * np.hypot(h, w):
        return 'the paper\'s corners are the frame\'s'
    return None


def page_homography(corners, px_per_mm):
    """Source corners (TL, TR, BR, BL) -> (3 x 3 homography onto the landscape letter page, (width, height))."""
    width, height = round(PAGE_W_IN * 25.4 * px_per_mm), round(PAGE_H_IN * 25.4 * px_per_mm)
    page = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float32)
    return cv2.getPerspectiveTransform(corners.astype(np.float32), page), (width, height)


def find_paper(rgb):
    """-> Rectified without pixels (rgb None): the corners in source px (or None), the fit, the paper's
    share and how much of its outline is the frame's; action: why not to rectify, or None."""
    scale = DETECT_SIDE / max(rgb.shape[:2])
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    scale = min(scale, 1.0)
    paper = paperness(small)
    outline = largest_outline(paper_mask(paper))
    if outline is None:
        return Rectified(None, 'no paper found')
    paper_share = cv2.contourArea(outline.reshape(-1, 1, 2)) / (small.shape[0] * small.shape[1])
    on_frame = on_frame_share(outline, small.shape[:2])
    corners = quad_of(outline) if paper_share >= MIN_PAPER_SHARE else None
    if corners is None:
        return Rectified(None, 'no quadrilateral of paper found', paper_share=paper_share, on_frame=on_frame)
    corners = refined_corners(outline, order_corners(corners), small.shape[:2])
    fit = fit_px(outline, corners)
    why = already_flat(corners, small.shape[:2], paper_share)
    if why is None and fit > MAX_FIT_SHARE * np.hypot(*small.shape[:2]):
        why = f'the paper\'s outline is no quadrilateral (off by {fit / scale:.0f} px on average)'
    contrast = edge_contrast(paper, corners)
    if why is None and not contrast >= MIN_EDGE_CONTRAST:
        why = f'what looks like the paper does not stand out from around it (edge contrast {contrast:.0f})'
    return Rectified(None, why, corners / scale, None, fit / scale, paper_share, on_frame, contrast)


def rectify(rgb, px_per_mm=PX_PER_MM):
    """(h, w, 3) uint8 RGB photo or scan -> Rectified: the paper warped onto the landscape letter page at
    px_per_mm, or the input array itself where there is nothing to undo (see the module's docstring)."""
    found = find_paper(rgb)
    if found.action is not None:
        found.rgb, found.action = rgb, f'untouched: {found.action}'
        return found
    homography, size_wh = page_homography(found.corners, px_per_mm)
    # what lies out of view is blank paper: repeated edge pixels would draw streaks the reader takes for ink
    found.rgb = cv2.warpPerspective(rgb, homography, size_wh, flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    found.action, found.homography, found.px_per_mm, found.size_wh = 'rectified', homography, px_per_mm, size_wh
    return found


def draw_corners(rgb, corners, rectified, thickness=None):
    """The photo with the quadrilateral `corners` (4 x (x, y), or None) drawn on it (green: rectified, red: left
    untouched), RGB; thickness in px (default: 1/400 of the photo's long side, at least 3)."""
    picture = rgb.copy()
    if corners is not None:
        colour = OUTLINE_RECTIFIED if rectified else OUTLINE_UNTOUCHED
        thickness = thickness or max(3, max(rgb.shape[:2]) // 400)
        corners = np.asarray(corners, np.float64)
        cv2.polylines(picture, [corners.round().astype(np.int32).reshape(-1, 1, 2)], True, colour, thickness)
        for x, y in corners:
            cv2.circle(picture, (int(x), int(y)), 4 * thickness, colour, -1)
    return picture


def write_outputs(image, found, rgb, out, show):
    """{stem}.png (the page), {stem}.json (found.summary), and with show {stem}_corners.png."""
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / f'{image.stem}.png'), cv2.cvtColor(found.rgb, cv2.COLOR_RGB2BGR))
    (out / f'{image.stem}.json').write_text(json.dumps({'image': str(image), **found.summary()}, indent=2))
    if show:
        cv2.imwrite(str(out / f'{image.stem}_corners.png'),
                    cv2.cvtColor(draw_corners(rgb, found.corners, found.homography is not None), cv2.COLOR_RGB2BGR))


def main(argv=None):
    args = parse_args(argv)
    if args.px_per_mm <= 0:
        raise ecg_cli.InputError('--px_per_mm must be positive')
    for image in args.images:
        rgb = page_image.read_rgb(image)
        found = rectify(rgb, args.px_per_mm)
        write_outputs(image, found, rgb, args.out, args.show)
        print(f'{image}: {found.action}, fit {found.fit_px:.1f} px, outline on the frame '
              f'{100 * found.on_frame:.0f} % -> {args.out / (image.stem + ".png")}')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
