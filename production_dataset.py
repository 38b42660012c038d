"""ECG image dataset: ecg-image-kit (or built-in simulator) PNG + JSON paired with Kaggle signal CSVs.

The signals come at 500 Hz over 10 s (12 x 5000, ecg_signals.py) with a validity mask, the page geometry from
its JSON (page_json.py). Here each sample is read, each head's target drawn from it (ecg_heads.HEADS: one entry a
head) at the network's input size (H, W), augmented and cached:

    image        (3, H, W)  float, ImageNet-normalized
    seg          (H, W)     int64, 0 background, 1..12 the lead whose trace covers the pixel (rhythm = its lead)
    grid         (H, W)     float, major (5 mm) grid lines; grid_valid = 0 when the JSON lacks grid geometry
    baseline     (H, W)     float, each plotted lead's 0 mV line
    theta        ()         page rotation in degrees (positive = clockwise on screen), theta_valid
    signal       (12, 5000) mV at 500 Hz, signal_mask (12, 5000): finite in the CSV and shown on the image
    trace_top / trace_bot / baseline_row  (15, W): per column, the rows the trace of each plotted lead spans
                 and the row of its 0 mV line (channels 12-14 = rhythm strips, top down); NaN where not plotted
    trace_window (15, 2)    seconds [first, last] sample each channel shows; trace_span (15, 2) its columns
    rhythm_leads (3,)       the lead each rhythm strip shows, top down (-1: the page draws fewer)
    px_per_mv    ()         input rows per mV

Validate a data set (counts, sampling rates, problems, timing, preview PNG of the targets):

    python production_dataset.py --sim_root /path/to/simulations --csv_root /path/to/train --max_samples 100
"""
import argparse
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import ecg_cli
import ecg_heads
import ecg_signals
import page_json
import page_image
import page_scale
from ecg_heads import derotate, fit_line, per_image, zero_mv_points
from ecg_page import LAYOUTS, LEADS, N_LEADS, N_RHYTHM, row_bands

DEFAULT_IMAGE_SIZE = (256, 1344)   # same pixels as 512 x 672, twice the time resolution (DESIGN.md)
MAX_SHIFT_FRACTION = 0.02          # translation augmentation, fraction of the input size
CREASES = (1, 6)                   # photo augmentation: creases drawn across the page, fewest and most
CREASE_SHADE = (0.06, 0.25)        # a crease's shading, share of the brightness (its two flanks: lit and shaded)

log = logging.getLogger('production_dataset')



@dataclass
class SampleRef:
    record_id: str
    png: Path
    json: Path
    csv: Path
    fs: float
    sig_len: int
    band: int = None   # which of the page's row bands (ecg_page.row_bands, top down); None: the whole page


# ---------------------------------------------------------------- finding samples

def find_samples(sim_root, csv_root, max_samples=None):
    """Pair every {id}-{k}.png under sim_root with its JSON and csv_root/{id}/{id}.csv.

    Returns (refs, problems): problems are (path, message) for files that cannot be paired."""
    sim_root, csv_root = Path(sim_root), Path(csv_root)
    if not sim_root.is_dir():
        raise ecg_cli.InputError(f'{sim_root}: --sim_root is not a folder')
    records = ecg_signals.read_train_csv(csv_root)
    if not any(sim_root.rglob('*.png')):
        raise ecg_cli.InputError(f'{sim_root}: no .png image anywhere under --sim_root (expected {{id}}-{{k}}.png + .json)')
    refs, problems, ids_with_images = [], [], set()
    for png in sorted(sim_root.rglob('*.png')):
        record_id = png.stem.rsplit('-', 1)[0]
        if record_id not in records:
            problems.append((png, f'id {record_id!r} is not in {csv_root / "train.csv"}'))
            continue
        ids_with_images.add(record_id)
        fs, sig_len = records[record_id]
        refs.append(SampleRef(record_id, png, png.with_suffix('.json'),
                              csv_root / record_id / f'{record_id}.csv', fs, sig_len))
    for record_id in sorted(set(records) - ids_with_images):
        problems.append((csv_root / record_id, f'id {record_id!r} has no images under {sim_root}'))
    if max_samples:
        refs = refs[:max_samples]
    return refs, problems


# ---------------------------------------------------------------- page rotation from the signal

def estimate_rotation(page, values):
    """Page rotation from the slope of the plotted leads' 0 mV lines (ecg-image-kit stores only a bound)."""
    theta = 0.0
    for _ in range(3):   # the 0 mV direction depends on the angle itself: a few fixed-point steps
        slopes, weights = [], []
        for entry in page['entries']:
            line = fit_line(zero_mv_points(entry, values, page['px_per_mv'], theta))
            if line is not None:
                slopes.append(line[1])
                weights.append(entry['end'] - entry['start'])
        if not slopes:
            return None
        theta = math.degrees(math.atan(np.average(slopes, weights=weights)))
    return theta


def band_of_page(page, band, theta, png_wh):
    """A whole 12-row page's geometry (parse_page) -> (that of its row band `band`, the crop for page_image.band_pixels):
    the band's strips in the upright crop's pixels, its layout (ecg_page.row_bands) and grid."""
    bands = row_bands(LAYOUTS[page_json.layout_name(page['layout_id'])])
    entries = [dict(e, xy=derotate(e['xy'], theta, png_wh)) for e in page['entries']]
    rows = np.full(N_LEADS, np.nan)
    for entry in entries:
        rows[entry['channel']] = np.nanmean(entry['xy'][:, 1])
    first, end = page_image.band_bounds(rows, band, png_wh[1])
    shift = np.array([0.0, first])
    layout = bands[band]
    channels = set(layout.lead_channels()[0][[LEADS.index(row[0]) for row in layout.rows]].tolist())
    kept = [dict(e, xy=e['xy'] - shift) for e in entries if e['channel'] in channels]
    grid = page['grid'] and dict(page['grid'], origin_xy=derotate(page['grid']['origin_xy'], theta, png_wh) - shift,
                                 center_xy=np.array([(png_wh[0] - 1) / 2, (end - first - 1) / 2]))
    return dict(page, entries=kept, grid=grid, rotation_deg=0.0, layout_id=page_json.LAYOUT_NAMES.index(layout.name),
                rhythm_leads=np.full(N_RHYTHM, -1, np.int64)), (theta, first, end)


def page_in_box(page, box):
    """A page's geometry (parse_page) in the pixels of its crop to `box` (page_scale.crop_to_grid)."""
    shift = np.array([box.x0, box.y0], np.float64)
    entries = [dict(e, xy=e['xy'] - shift) for e in page['entries']]
    grid = page['grid'] and dict(page['grid'], origin_xy=page['grid']['origin_xy'] - shift,
                                 center_xy=page['grid']['center_xy'] - shift)
    return dict(page, entries=entries, grid=grid)


def read_image(path, size_hw, crop=None):
    """Page file -> ((H, W, 3) uint8 RGB picture at the input size, (w, h) of the file, its RGB); crop: a row
    band's (page_image.band_pixels), read instead of the whole page."""
    rgb = page_image.read_rgb(path)
    if crop is not None:
        rgb = page_image.band_pixels(rgb, crop)
    return page_image.resize_page(rgb, size_hw), rgb.shape[1::-1], rgb



def page_rotation(page, values):
    """The page's rotation in degrees and whether it is known: from the JSON, else from the 0 mV lines."""
    theta = page['rotation_deg']
    if theta is None:
        theta = estimate_rotation(page, values)
    return (theta or 0.0), theta is not None


def build_sample(ref, size_hw, scale=False):
    """Read one sample and build every head's target (ecg_heads.HEADS) at the input size (no augmentation); with
    scale, also the scale the page itself shows (page_scale.read_scale: what evaluation decodes with, as inference
    does).

    Returns a dict of numpy arrays; raises ecg_cli.SampleError naming the file on bad input."""
    page = page_json.parse_page(ref)
    raw = ecg_signals.read_signal_csv(ref.csv, ref.fs, ref.sig_len)
    signal = np.stack([ecg_signals.resample_lead(column, ref.fs) for column in raw.T])
    theta, theta_known = page_rotation(page, raw)
    crop = None
    if ref.band is not None:
        page, crop = band_of_page(page, ref.band, theta, page_image.png_size(ref.png))
        theta, theta_known = 0.0, True
    image, png_wh, rgb = read_image(ref.png, size_hw, crop)
    if scale and crop is None:   # read as inference reads it: padding around the grid cut off
        rgb, box = page_scale.crop_to_grid(rgb)
        if box is not None:
            page, image, png_wh = page_in_box(page, box), page_image.resize_page(rgb, size_hw), rgb.shape[1::-1]
    drawn = ecg_heads.DrawnPage(page, raw, signal, ref.fs, theta, theta_known, png_wh, size_hw)
    sample = {}
    for head in ecg_heads.HEADS:
        sample.update(head.targets(drawn))
    if not sample['signal_mask'].any():
        raise ecg_cli.SampleError(f'{ref.json}: no plotted sample of the image has a finite value in {ref.csv}')
    read = page_scale.read_scale(rgb, size_hw) if scale else (float('nan'), float('nan'), {})
    sample.update(page_fields(drawn, read), image=image)
    return sample


def page_fields(drawn, read):
    """The page's own fields (PAGE_FIELDS) beside the heads' targets: its scale as drawn and as read
    (page_scale.read_scale -> read), its aspect and its layout."""
    page, png_wh = drawn.page, drawn.png_wh
    read_px_per_mv, read_px_per_s, found = read
    return dict(style=page['style'], px_per_mv=np.float32(page['px_per_mv'] * drawn.scale_xy[1]),
                read_px_per_mv=np.float32(read_px_per_mv), read_px_per_s=np.float32(read_px_per_s),
                gain_mm_mv=np.float32(page['gain_mm_mv']), paper_speed_mm_s=np.float32(page['paper_speed_mm_s']),
                read_gain_mm_mv=np.float32(page_scale.pulse_reading(found, 'gain_mm_mv', 'gain_assumed')),
                read_speed_mm_s=np.float32(page_scale.pulse_reading(found, 'paper_speed_mm_s', 'speed_assumed')),
                read_start=np.float32(found.get('trace_start_column', float('nan'))),
                page_aspect=np.float32(png_wh[0] / png_wh[1]),
                rhythm_leads=page['rhythm_leads'].astype(np.int64), layout_id=np.int64(page['layout_id']),
                lead_channel=page['lead_channel'].astype(np.int64), lead_sign=page['lead_sign'].astype(np.float32))


def check_sample(ref):
    """Full check of one sample before training: JSON, CSV values and the decoded pixels (a PNG whose
    header reads but whose pixels do not would otherwise end a long run); raises ecg_cli.SampleError. -> the
    page's layout name (ecg_page.LAYOUTS), or None for strips no known layout draws."""
    page = page_json.parse_page(ref)
    ecg_signals.read_signal_csv(ref.csv, ref.fs, ref.sig_len)
    page_image.read_rgb(ref.png)
    return page_json.layout_name(page['layout_id'])


# ---------------------------------------------------------------- augmentation

def photometric_augment():
    """Colour, blur, noise and compression: they never move a target. GaussNoise takes std_range in
    albumentations 2.x (var_limit is silently ignored there). Imported here: it adds half a second to the
    start of every tool that only reads pages (inference, evaluate, visualize)."""
    import albumentations as A
    return A.Compose([
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RGBShift(r_shift_limit=15, g_shift_limit=15, b_shift_limit=15, p=0.3),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.3),
        A.ToGray(p=0.05),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 3)), A.MotionBlur(blur_limit=(3, 3))], p=0.15),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
        A.ImageCompression(quality_range=(60, 95), p=0.2),
    ])


def photo_augment():
    """What a phone photo of a printed page still shows once the page is found and flattened (page_rectify):
    uneven light and shadows, a colour cast of the room's light, soft focus, sensor noise and JPEG (creases:
    draw_creases). Photometric only, so it never moves a target."""
    import albumentations as A
    return A.Compose([
        A.OneOf([A.Illumination(mode='linear', intensity_range=(0.05, 0.2)),
                 A.Illumination(mode='corner', intensity_range=(0.05, 0.2)),
                 A.Illumination(mode='gaussian', intensity_range=(0.05, 0.2)),
                 A.PlasmaShadow(shadow_intensity_range=(0.1, 0.4), plasma_size=256, roughness=3.0)], p=0.9),
        A.PlanckianJitter(temperature_limit=(4000, 9000), p=0.4),
        A.RandomGamma(gamma_limit=(70, 95), p=0.4),   # a print's faint 1 mm lines fade into the paper
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=(-0.25, 0.1), p=0.5),
        # the trace is about a pixel wide at 128 rows: more blur, or a nearest-pixel downscale, erases it
        A.OneOf([A.Downscale(scale_range=(0.7, 0.9),
                             interpolation_pair={'downscale': cv2.INTER_AREA, 'upscale': cv2.INTER_LINEAR}),
                 A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.6))], p=0.2),
        A.ISONoise(color_shift=(0.01, 0.04), intensity=(0.1, 0.3), p=0.3),
        A.ImageCompression(quality_range=(50, 95), p=0.4),
    ])


def draw_creases(image, rng):
    """(H, W, 3) uint8 page with CREASES lines across it, each lit on one flank and shaded on the other, as a
    crumpled or folded sheet throws the light; a new array."""
    height, width = image.shape[:2]
    light = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(CREASES[0], CREASES[1] + 1))):
        (x0, y0), (x1, y1) = rng.uniform((0, 0), (width, height), (2, 2))
        direction = np.array([x1 - x0, y1 - y0]) / max(math.hypot(x1 - x0, y1 - y0), 1e-6)
        normal = np.array([-direction[1], direction[0]])
        reach = 2.0 * max(width, height)
        a, b = np.array([x0, y0]) - reach * direction, np.array([x0, y0]) + reach * direction
        shade, side = rng.uniform(*CREASE_SHADE), float(rng.choice([-1.0, 1.0]))
        for offset, sign in ((1.0, side), (-1.0, -side)):
            lit = np.round(np.stack([a, b]) + offset * normal).astype(np.int32)
            cv2.line(light, tuple(lit[0]), tuple(lit[1]), sign * shade, thickness=1, lineType=cv2.LINE_AA)
    light = cv2.GaussianBlur(light, (0, 0), float(rng.uniform(0.5, 1.0)))
    return np.clip(image.astype(np.float32) * (1.0 + light[..., None]), 0, 255).astype(np.uint8)


def shift_map(array, dy, dx, border=cv2.BORDER_CONSTANT):
    """Translate an (H, W[, 3]) map by whole pixels."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(array, matrix, (array.shape[1], array.shape[0]), flags=cv2.INTER_NEAREST,
                          borderMode=border)


def shift_columns(rows, dy, dx):
    """Translate (15, W) per-column row arrays by (dx, dy) page-frame pixels (dx may be fractional)."""
    out = np.full_like(rows, np.nan)
    cols = np.arange(rows.shape[1])
    for channel, values in enumerate(rows):
        have = np.flatnonzero(np.isfinite(values))
        if len(have) < 2:
            continue
        moved = cols - dx
        inside = (moved >= have[0]) & (moved <= have[-1])
        out[channel, inside] = np.interp(moved[inside], have, values[have]) + dy
    return out


def page_frame_shift(dy, dx, theta_deg, size_hw, page_aspect):
    """A translation of the image, seen in the de-rotated page frame at the (anisotropic) input size."""
    t = math.radians(float(theta_deg))
    stretch = (size_hw[1] / size_hw[0]) / float(page_aspect)     # input x-scale over y-scale
    return (-dx * math.sin(t) / stretch + dy * math.cos(t),
            dx * math.cos(t) + dy * math.sin(t) * stretch)


def translate_sample(sample, dy, dx):
    """Move the image and every target field with it (ecg_heads.Field.moves): maps by whole pixels in the image frame,
    per-column targets by the same motion seen in the de-rotated page frame."""
    out = dict(sample)
    out['image'] = shift_map(sample['image'], dy, dx, cv2.BORDER_REPLICATE)
    page_dy, page_dx = page_frame_shift(dy, dx, sample['theta'], sample['image'].shape[:2], sample['page_aspect'])
    for name, field in ecg_heads.TARGET_FIELDS.items():
        if field.moves == 'pixels':
            out[name] = shift_map(sample[name], dy, dx)
        elif field.moves == 'page_rows':
            out[name] = shift_columns(sample[name], page_dy, page_dx)
        elif field.moves == 'page_columns':
            out[name] = sample[name] + np.float32(page_dx)
    return out


# ---------------------------------------------------------------- dataset

PAGE_FIELDS = {   # a sample's fields beside the heads' targets (ecg_heads.HEADS: TARGET_FIELDS)
    'image': ecg_heads.Field(lambda h, w: (h, w, 3), torch.uint8),
    'px_per_mv': per_image(), 'read_px_per_mv': per_image(), 'read_px_per_s': per_image(),
    'gain_mm_mv': per_image(), 'paper_speed_mm_s': per_image(), 'read_gain_mm_mv': per_image(),
    'read_speed_mm_s': per_image(), 'read_start': per_image(), 'page_aspect': per_image(),
    'rhythm_leads': ecg_heads.Field(lambda h, w: (N_RHYTHM,), torch.int64),
    'lead_channel': ecg_heads.Field(lambda h, w: (N_LEADS,), torch.int64),
    'lead_sign': ecg_heads.Field(lambda h, w: (N_LEADS,), torch.float32),
    'layout_id': per_image(torch.int64),
}
CACHE_FIELDS = {**PAGE_FIELDS, **ecg_heads.TARGET_FIELDS}


def band_refs(ref, name):
    """The refs of the row bands of a page of layout `name` (ecg_page.row_bands: a 12x1 page is read again in
    three bands of four rows, so training shows the model those crops too); none for most layouts."""
    return [replace(ref, band=k) for k in range(len(row_bands(LAYOUTS[name])))] if name else []


def split_by_record(refs, val_fraction, seed):
    """Train/validation split by record id, so no signal is seen in both."""
    ids = sorted({ref.record_id for ref in refs})
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 and len(ids) > 1 else 0
    val_ids = set(ids[:n_val])
    return [r for r in refs if r.record_id not in val_ids], [r for r in refs if r.record_id in val_ids]


@dataclass
class CheckedSamples:
    """The usable samples of a data set (check_sample passed) with each one's layout name, and the problems of the
    others as (png, message)."""
    refs: list
    layouts: list
    problems: list

    def split(self, val_fraction, seed):
        """(train, validation) CheckedSamples by record (split_by_record): drawn from the usable samples only, so
        a bad file cannot leave a split empty; the same for a seed and the same usable samples."""
        train_refs, val_refs = split_by_record(self.refs, val_fraction, seed)
        layout = {id(ref): name for ref, name in zip(self.refs, self.layouts)}
        return tuple(CheckedSamples(part, [layout[id(ref)] for ref in part], []) for part in (train_refs, val_refs))


def check_samples(refs, progress=False):
    """Every sample checked (check_sample: JSON, CSV values, decoded pixels) -> CheckedSamples."""
    good, layouts, problems = [], [], []
    for ref in tqdm(refs, desc='checking samples', disable=not progress, mininterval=ecg_cli.PROGRESS_SECONDS):
        try:
            layouts.append(check_sample(ref))
            good.append(ref)
        except ecg_cli.SampleError as exc:
            problems.append((str(ref.png), str(exc)))
    return CheckedSamples(good, layouts, problems)


class ECGImageDataset(Dataset):
    """Samples (SampleRef: a {id}-{k}.png + .json with csv_root/{id}/{id}.csv) as training tensors.

    refs: a list of SampleRef, each checked here, or a CheckedSamples (check_samples) taken as it is; from_folders
    pairs the files of two folders. Bad samples are reported (self.problems, the log) and skipped, never trained
    on. With cache=True every sample is decoded once, in this process, into contiguous shared-memory tensors that
    DataLoader workers read without copying. read_scale: decode with the scale the page shows, as inference does
    (evaluation); row_bands: each page's row bands follow it (band_refs).
    """

    def __init__(self, refs, target_size=DEFAULT_IMAGE_SIZE, augment=False, cache=False, progress=False,
                 read_scale=False, row_bands=False, photo_prob=0.0):
        self.size_hw = tuple(int(v) for v in target_size)
        self.augment = augment
        self.photo_prob = photo_prob    # share of augmented samples made to look like a photo (photo_augment)
        self.read_scale = read_scale
        self.problems = []
        self.layouts = Counter()        # layout name (None: unknown strips) -> checked samples
        self.row_bands = row_bands      # a page's layout is learned while checking or caching, its bands with it
        if isinstance(refs, CheckedSamples) and not cache:
            self.refs = self._with_bands(refs)
        else:
            refs = refs.refs if isinstance(refs, CheckedSamples) else refs
            self.refs = list(refs) if cache else self._keep_good(refs, progress)
        self.photometric = photometric_augment()
        self.photo = photo_augment() if photo_prob > 0 else None
        self.cache = self._fill_cache(progress) if cache else None
        for path, message in self.problems:
            log.warning('skipped %s: %s', path, message)

    @classmethod
    def from_folders(cls, sim_root, csv_root, max_samples=None, **options):
        """Every {id}-{k}.png + .json under sim_root paired with csv_root/{id}/{id}.csv (find_samples; at most
        max_samples); the files that cannot be paired are reported in problems. options: __init__'s."""
        refs, unpaired = find_samples(sim_root, csv_root, max_samples)
        for path, message in unpaired:
            log.warning('skipped %s: %s', path, message)
        dataset = cls(refs, **options)
        dataset.problems[:0] = [(str(path), message) for path, message in unpaired]
        return dataset

    def _keep_good(self, refs, progress):
        checked = check_samples(refs, progress)
        self.problems.extend(checked.problems)
        return self._with_bands(checked)

    def _with_bands(self, checked):
        """The checked refs, each followed by its row bands' (band_refs) when the data set reads them."""
        good = []
        for ref, name in zip(checked.refs, checked.layouts):
            bands = band_refs(ref, name) if self.row_bands else []
            good += [ref] + bands
            self.layouts.update([name] + [row_bands(LAYOUTS[name])[band.band].name for band in bands])
        return good

    def _fill_cache(self, progress):
        samples, refs = [], []
        for ref in tqdm(self.refs, desc='caching samples', disable=not progress,
                        mininterval=ecg_cli.PROGRESS_SECONDS):
            try:
                sample = build_sample(ref, self.size_hw, self.read_scale)
                bands = band_refs(ref, page_json.layout_name(sample['layout_id'])) if self.row_bands else []
                built = [sample] + [build_sample(band, self.size_hw, self.read_scale) for band in bands]
            except ecg_cli.SampleError as exc:
                self.problems.append((str(ref.png), str(exc)))
                continue
            samples += built
            refs += [ref] + bands
        self.refs = refs
        self.layouts.update(page_json.layout_name(sample['layout_id']) for sample in samples)
        self.styles = [sample['style'] for sample in samples]   # short strings; the arrays are below
        cache = {}
        for name, field in CACHE_FIELDS.items():
            cache[name] = torch.empty((len(samples),) + field.shape(*self.size_hw), dtype=field.cached).share_memory_()
            for i, sample in enumerate(samples):
                cache[name][i] = torch.as_tensor(np.asarray(sample[name]))
        return cache

    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.cache.values()) if self.cache else 0

    def __len__(self):
        return len(self.refs)

    def base_sample(self, index):
        """Un-augmented sample as numpy arrays, from the cache or decoded now."""
        if self.cache is not None:
            sample = {name: tensor[index].numpy() for name, tensor in self.cache.items()}
            sample['style'] = self.styles[index]
            return sample
        return build_sample(self.refs[index], self.size_hw, self.read_scale)

    def __getitem__(self, index):
        for attempt in range(len(self.refs)):
            i = (index + attempt) % len(self.refs)
            try:
                sample = self.base_sample(i)
                break
            except ecg_cli.SampleError as exc:   # e.g. a PNG whose header reads but whose pixels do not
                log.error('skipped sample %s: %s', self.refs[i].png, exc)
                self.problems.append((str(self.refs[i].png), str(exc)))
        else:
            raise ecg_cli.SampleError('no readable sample left in the data set')
        if self.augment:
            sample = self.augment_sample(sample)
        return self.to_tensors(sample, self.refs[i])

    def augment_sample(self, sample):
        """Per-sample seed drawn from torch's RNG: each DataLoader worker (seeded by torch per worker and
        per epoch) gets its own augmentations, and albumentations' private RNG is reseeded with it."""
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        rng = np.random.default_rng(seed)
        height, width = self.size_hw
        dy = int(rng.integers(-round(MAX_SHIFT_FRACTION * height), round(MAX_SHIFT_FRACTION * height) + 1))
        dx = int(rng.integers(-round(MAX_SHIFT_FRACTION * width), round(MAX_SHIFT_FRACTION * width) + 1))
        sample = translate_sample(sample, dy, dx)
        self.photometric.set_random_seed(seed)
        sample['image'] = self.photometric(image=np.ascontiguousarray(sample['image']))['image']
        if self.photo is not None and rng.random() < self.photo_prob:
            self.photo.set_random_seed(seed + 1)
            sample['image'] = self.photo(image=draw_creases(sample['image'], rng))['image']
        return sample

    def to_tensors(self, sample, ref):
        out = {name: torch.as_tensor(np.array(sample[name])) for name in CACHE_FIELDS if name != 'image'}
        for name, field in ecg_heads.TARGET_FIELDS.items():
            if field.batched is not None:
                out[name] = out[name].to(field.batched)
        out['image'] = page_image.normalize(sample['image'])
        out['record_id'] = ref.record_id
        out['png'] = str(ref.png)
        out['fs'] = torch.tensor(ref.fs, dtype=torch.float32)
        out['style'] = sample['style']
        return out



# ---------------------------------------------------------------- validation CLI

LEAD_COLOURS = np.array([[0, 0, 0]] + [[int(255 * c) for c in col] for col in (
    (0.9, 0.1, 0.1), (0.1, 0.6, 0.1), (0.1, 0.2, 0.9), (0.9, 0.5, 0.0), (0.6, 0.0, 0.7), (0.0, 0.7, 0.7),
    (0.7, 0.7, 0.0), (1.0, 0.2, 0.6), (0.4, 0.3, 0.1), (0.2, 0.8, 0.4), (0.3, 0.3, 0.6), (0.9, 0.3, 0.3))],
    np.uint8)


def preview_panel(sample):
    """Input image with the seg target (lead colours), 0 mV lines (green) and grid target (blue) overlaid."""
    panel = page_image.denormalize(sample['image']).copy()
    grid = sample['grid'].numpy() > 0
    panel[grid] = (0.6 * panel[grid] + 0.4 * np.array([60, 120, 255])).astype(np.uint8)
    base = sample['baseline'].numpy() > 0
    panel[base] = (0, 200, 0)
    seg = sample['seg'].numpy()
    panel[seg > 0] = LEAD_COLOURS[seg[seg > 0]]
    caption = f"{sample['record_id']} fs={float(sample['fs']):g} theta={float(sample['theta']):+.2f} deg"
    cv2.putText(panel, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 160), 1, cv2.LINE_AA)
    return panel


def write_preview(dataset, path, n=4):
    panels = [preview_panel(dataset[i]) for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(panels, axis=0), cv2.COLOR_RGB2BGR))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Validate an ECG image data set and preview its targets.')
    parser.add_argument('--sim_root', required=True, help='folder with {id}-{k}.png + .json (searched recursively)')
    parser.add_argument('--csv_root', required=True, help='folder with train.csv and {id}/{id}.csv')
    parser.add_argument('--max_samples', type=int, default=100, help='check at most this many images')
    parser.add_argument('--image_size', type=int, nargs=2, default=DEFAULT_IMAGE_SIZE, metavar=('H', 'W'))
    parser.add_argument('--preview', default='data_check/preview.png', help='PNG of a few samples with targets')
    parser.add_argument('--cache', action='store_true', help='also time filling the in-memory cache')
    return parser.parse_args(argv)


def report(dataset, seconds, n_found):
    fs_counts = pd.Series([ref.fs for ref in dataset.refs]).value_counts().sort_index()
    print(f'images found: {n_found}   usable: {len(dataset)}   problems: {len(dataset.problems)}')
    print('sampling rates (Hz: images): ' + ', '.join(f'{fs:g}: {n}' for fs, n in fs_counts.items()))
    for path, message in dataset.problems:
        print(f'  PROBLEM {message}' if str(path) in message else f'  PROBLEM {path}: {message}')
    print(f'seconds per sample (decode + targets + augmentation): {seconds:.4f}')


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(message)s')
    refs, problems = find_samples(args.sim_root, args.csv_root, args.max_samples)
    dataset = ECGImageDataset(refs, target_size=args.image_size, augment=True, progress=True)
    dataset.problems[:0] = [(str(p), m) for p, m in problems]
    if len(dataset) == 0:
        report(dataset, float('nan'), len(refs))
        raise SystemExit('no usable sample: fix the problems above')
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    report(dataset, (time.perf_counter() - start) / len(dataset), len(refs))
    if args.cache:
        start = time.perf_counter()
        cached = ECGImageDataset(dataset.refs, target_size=args.image_size, cache=True)
        print(f'cache: {len(cached)} samples in {time.perf_counter() - start:.1f} s, '
              f'{cached.cache_bytes() / 2 ** 20:.1f} MiB')
    write_preview(dataset, args.preview)
    print(f'preview written: {args.preview}')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
