"""Reading a page: the one path from an image to its 12-lead signal. inference.py, evaluate.py, visualize.py,
the trainer's validation and the benchmarks all read pages here, so each step is written once:

    find     find_page: a photo's paper found and its perspective undone (page_rectify), padding around the
             grid cut off (page_scale.crop_to_grid); a render or scan comes back as it is
    scale    page_scale.read_scale: px per mV and per s from the page's grid and calibration pulse
    prepare  page_image.preprocess: the network's input (3, H, W); stack_inputs: a batch of them
    read     read_signals: the network's maps decoded (ecg_model) into signals (B, 12, 5000) with the scale,
             layout and lead order the page shows, and 12x1 pages read again in row bands (read_row_bands)

A Reader is the network with what reading needs beside the page (input size, device, layouts).
"""
import sys
from collections import deque
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np
import torch

import ecg_checkpoint
import ecg_cli
import ecg_decode
import export_onnx
import page_flatten
import page_image
import page_rectify
import page_scale
import speed
from ecg_page import LAYOUTS, MM_PER_MV, N_LEADS, row_bands, whole_pages, with_cabrera

READERS = 2                            # pages decoded and measured at once: PNG decoding and the grid FFT are
                                       # most of the CPU time on full-size pages
READ_AHEAD = 1                         # batches of pages read beyond the next one while the model runs
PAPER_TOL = 40                         # RGB distance from the paper's colour that is still paper
CONFIDENCE_HALF_MV = 0.1               # a row spread of 0.1 mV (1 mm at 10 mm/mV) halves the confidence


# ---------------------------------------------------------------- the network a page is read with

def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ecg_cli.InputError('--device cuda: CUDA is not available on this machine')
    if name == 'mps' and not torch.backends.mps.is_available():
        raise ecg_cli.InputError('--device mps: MPS is not available on this machine')
    return torch.device(name)


def checkpoint_path(given):
    """--checkpoint as given, or the starter weights shipped with the toolkit (and the user is told so)."""
    if given is not None:
        return given
    if not ecg_checkpoint.STARTER.is_file():
        raise ecg_cli.InputError(f'--checkpoint is needed: no starter weights in this copy ({ecg_checkpoint.STARTER})')
    print(f'no --checkpoint: using the starter weights {ecg_checkpoint.STARTER} '
          f'(see {ecg_checkpoint.STARTER.parent / "MODEL_CARD.md"})')
    return ecg_checkpoint.STARTER


def load_checkpoint(path, device):
    """(model in eval mode, its input size (H, W)); a missing or broken file is an InputError naming it.
    model.trained_layouts: the page layouts it was trained on (the checkpoint's 'layouts')."""
    model, checkpoint = ecg_checkpoint.load_model(path, device)
    model.trained_layouts = ecg_checkpoint.trained_layouts(checkpoint)
    return model, ecg_checkpoint.input_size(checkpoint)


def auto_layouts(model):
    """What --layout auto chooses among: the page layouts the model was trained on and their Cabrera twins."""
    return whole_pages(with_cabrera(getattr(model, 'trained_layouts', ecg_checkpoint.TRAINED_LAYOUTS)))


def candidate_layouts(model, layout):
    """The layouts inference chooses among: --layout NAME, or auto (auto_layouts). A page layout the model
    never saw is read, with a warning (its strips may be misplaced)."""
    trained = whole_pages(getattr(model, 'trained_layouts', ecg_checkpoint.TRAINED_LAYOUTS))
    if layout == 'auto':
        return auto_layouts(model)
    if layout not in auto_layouts(model):
        print(f'warning: --layout {layout}: this model was trained on {", ".join(trained)} only; '
              f'its reading of {layout} pages is untested', file=sys.stderr)
    return [layout]


def load_network(checkpoint, device, threads=None, onnx=None):
    """(model, its input size (H, W)): the checkpoint's model with its batch norms folded, channels_last
    where the trainer runs so (1.5x faster on the CPU), or an ONNX export (onnx) in onnxruntime."""
    if onnx:
        if not onnx.is_file():
            raise ecg_cli.InputError(f'{onnx}: ONNX file not found')
        try:
            network = export_onnx.OnnxDigitizer(onnx, threads)
        except Exception as exc:   # onnxruntime's errors have many types
            raise ecg_cli.InputError(f'{onnx}: not an ONNX export of this toolkit ({type(exc).__name__}: {exc})') from exc
        return network, network.image_size
    model, size_hw = load_checkpoint(checkpoint, device)
    model = speed.fold_batch_norm(model)
    if device.type in ('cpu', 'cuda'):
        model = model.to(memory_format=torch.channels_last)
    return model, size_hw


@dataclass
class Reader:
    """A network ready to read pages, with what every reading needs beside the page."""
    model: torch.nn.Module      # ecg_model.ECGDigitizer, or export_onnx.OnnxDigitizer
    size_hw: tuple              # (H, W): the input size it reads at
    device: torch.device
    layouts: list               # layout names decoding chooses among (auto_layouts, or --layout's one)
    trained: tuple = ()         # layout names it was trained on: a page is read again in row bands among these


def open_reader(checkpoint, device, threads=None, onnx=None, layout='auto'):
    """The Reader inference.py reads with: load_network's model, choosing among candidate_layouts(layout)."""
    model, size_hw = load_network(checkpoint, device, threads, onnx)
    return Reader(model, size_hw, device, candidate_layouts(model, layout), getattr(model, 'trained_layouts', ()))


def find_images(path, pdf_dpi=page_image.PDF_DPI):
    """--image as given -> the pages to read (page_image.ImagePage: every page of a multi-page TIFF or a PDF, a
    PDF's rasterized at pdf_dpi), in file order; a folder is searched recursively."""
    if path.is_dir():
        files = sorted(p for p in path.rglob('*') if p.suffix.lower() in page_image.IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ecg_cli.InputError(f'{path}: no {"/".join(page_image.IMAGE_SUFFIXES)} image in this folder')
    elif path.is_file():
        files = [path]
    else:
        raise ecg_cli.InputError(f'{path}: image not found')
    return [page for file in files for page in page_image.image_pages(file, pdf_dpi)]


# ---------------------------------------------------------------- reading a batch of pages

def to_device(inputs, device):
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}


@torch.inference_mode()
def read_signals(reader, inputs, pixels, maps=None, told=None):
    """A batch of pages -> the network's outputs, 'signal' (B, 12, 5000) mV as inference writes it: the maps
    decoded with each page's real aspect (a squeezed wide input changes the page's shape, and the de-rotation
    must know it), the scale its grid and calibration pulse show (padding, cropping or rescaling the page leaves
    amplitudes right), its layout found among reader.layouts, and pages of a layout whose row bands the model
    was trained on read again in them (read_row_bands).
    inputs: stack_inputs' (or a data set batch with the same keys); pixels: index -> page i's (h, w, 3) RGB,
    as the inputs were made from it (found_pixels, known_pixels); maps: the network's raw outputs when the
    caller has run it already (the trainer's validation), decoded here instead of running it again; told: what
    to decode with beside what the pages show (ecg_decode.Geometry fields: a known rotation, a start weight
    tried: the trainer's decoding tuning), also in the row bands."""
    inputs = to_device(inputs, reader.device)
    geometry = replace(ecg_decode.read_geometry(inputs, reader.layouts), **(told or {}))
    if maps is None:
        outputs = reader.model(inputs['image'], geometry=geometry)
    else:
        outputs = ecg_decode.decode_outputs(maps, geometry)
    return read_row_bands(reader, outputs, inputs, pixels, geometry.start_weight)


def banded_pages(outputs, trained):
    """[(page index, its row bands)] of a batch's pages whose found layout is read again in row bands
    (ecg_page.row_bands) that the model was trained on (trained: layout names)."""
    pages = []
    for i, name in enumerate(found_layouts(outputs)):
        bands = row_bands(LAYOUTS[name])
        if bands and all(band.name in trained for band in bands):
            pages.append((i, bands))
    return pages


def place_rows(outputs, i, page_height):
    """(12,) rows (px of the upright page) where each place's strip runs, from the first reading: the median
    0 mV row over the columns where the strip is present."""
    zero, present = outputs['trace_rows']['zero'][i, :N_LEADS], outputs['trace_rows']['presence'][i, :N_LEADS] > 0
    rows = [torch.median(z[p] if p.any() else z).item() for z, p in zip(zero, present)]
    return (np.array(rows) + 0.5) * page_height / outputs['trace'].shape[-2] - 0.5


def upright_page(rgb, outputs, i):
    """Page i's pixels turned upright by the first reading's rotation, as band_pixels turns them: (h, w, 3)."""
    return page_image.band_pixels(rgb, (float(outputs['decode_theta'][i]), 0, rgb.shape[0]))


def band_row(upright, outputs, inputs, i, k, size_hw):
    """Row band k of page i, cut from its upright pixels (upright_page) where the first reading put its rows, as a
    model input row with the page's own scale carried over: (input (3, H, W), aspect, px_per_mv, px_per_s,
    speed, start)."""
    first, end = page_image.band_bounds(place_rows(outputs, i, upright.shape[0]), k, upright.shape[0])
    crop = upright[first:end]
    # rows per mV as decoded (page or border, --gain), on the crop's fewer px; columns as the page's
    px_per_mv = float(outputs['trace_rows']['px_per_mv'][i]) * upright.shape[0] / crop.shape[0]
    read_px_per_s = float(inputs['read_px_per_s'][i])
    px_per_s = read_px_per_s if np.isfinite(read_px_per_s) else float(
        ecg_decode.border_px_per_s(size_hw[1], inputs['page_aspect'][i:i + 1])[0])
    speed = float(inputs['read_speed_mm_s'][i]) if np.isfinite(read_px_per_s) else float('nan')
    image, _, aspect = page_image.preprocess(crop, size_hw)
    return image, aspect, px_per_mv, px_per_s, speed, float(inputs['read_start'][i])


def read_row_bands(reader, outputs, inputs, pixels, start_weight=None):
    """Second reading of the pages whose layout has row bands the model was trained on (12x1): each band is
    cut from the upright page and read at the full input size, and its leads replace the first reading's
    (outputs['signal'] in place; 'row_bands' names the bands read per page), and so does their row spread
    ('spread' (B, 12, 5000), what lead_confidence reports). pixels: index -> the page's (h, w, 3) RGB, read
    when needed (once a page, turned upright once for all its bands); start_weight: the bands' time-start pull
    (None: the model's own). The rest of outputs (rows, layout) stays the first reading's."""
    banded = banded_pages(outputs, reader.trained)
    outputs['row_bands'] = [[] for _ in range(len(outputs['signal']))]
    if banded:
        outputs['spread'] = ecg_decode.row_spread(outputs)
    upright = {i: upright_page(pixels(i), outputs, i) for i, _ in banded}
    for k in range(max((len(bands) for _, bands in banded), default=0)):
        todo = [(i, bands[k]) for i, bands in banded]
        rows = [band_row(upright[i], outputs, inputs, i, k, reader.size_hw) for i, _ in todo]
        images, aspects, px_per_mv, px_per_s, speeds, starts = zip(*rows)
        geometry = ecg_decode.Geometry(theta=torch.zeros(len(rows), device=reader.device),
                                       layouts=sorted({b.name for _, b in todo}), start_weight=start_weight,
                                       **{key: torch.tensor(values, dtype=torch.float32, device=reader.device)
                                          for key, values in (('page_aspect', aspects), ('px_per_mv', px_per_mv),
                                                              ('px_per_s', px_per_s), ('paper_speed', speeds),
                                                              ('start', starts))})
        band_out = reader.model(torch.stack(images).to(reader.device), geometry=geometry)
        band_spread = ecg_decode.row_spread(band_out)
        for j, (i, band) in enumerate(todo):
            leads = torch.from_numpy(band.shown_mask().any(1)).to(outputs['signal'].device)
            outputs['signal'][i, leads] = band_out['signal'][j, leads].to(outputs['signal'].dtype)
            outputs['spread'][i, leads] = band_spread[j, leads].to(outputs['spread'].dtype)
            outputs['row_bands'][i].append(band_out['trace_rows']['layouts'][j])
    return outputs


@dataclass
class PageReading:
    """One page as read (page_readings): what inference.py writes and evaluate.py scores."""
    signal: np.ndarray          # (12, 5000) float32 mV at 500 Hz as read, every lead (shown_signal: what the page shows)
    layout: str                 # the layout found (ecg_page.LAYOUTS)
    scale: dict                 # what its grid and pulse showed (page_scale.read_scale; --gain, --paper_speed)
    rotation_deg: float
    px_per_mv_input: float      # the scale decoded with, in input rows per mV
    row_bands: list             # names of the row bands it was read again in
    spread_mv: np.ndarray       # (12,) mean row spread over the samples shown (lead_confidence)
    confidence: np.ndarray      # (12,) 0..1
    lead_order: object          # ecg_decode.LeadOrder where its layout has a Cabrera twin, else None
    page_found: dict            # what finding the page did (find_page), or None
    paper_share: float          # share of the input that is paper (paper_share)
    trace_share: float          # share of the input the seg head calls trace

    def shown_signal(self):
        """(12, 5000) float64 mV with NaN where the layout found does not show the lead."""
        return shown_signal(self.signal, self.layout)


def page_readings(outputs, inputs):
    """read_signals' outputs for a batch and its inputs (stack_inputs) -> [PageReading] per page."""
    signals = outputs['signal'].float().cpu().numpy()
    spread, confidence = lead_confidence(outputs)
    trace_share = (outputs['seg'].argmax(1) > 0).float().mean((1, 2)).cpu().tolist()
    lead_orders = outputs['trace_rows'].get('lead_orders') or [None] * len(signals)
    row_bands = outputs.get('row_bands') or [[] for _ in signals]
    page_found = inputs.get('page_found') or [None] * len(signals)
    return [PageReading(signals[i], layout, inputs['scale'][i], float(outputs['decode_theta'][i]),
                        float(outputs['trace_rows']['px_per_mv'][i]), row_bands[i], spread[i], confidence[i],
                        lead_orders[i], page_found[i], inputs['paper_share'][i], trace_share[i])
            for i, layout in enumerate(found_layouts(outputs))]


def lead_confidence(outputs):
    """Per image and lead, how sure the signal head was: the mean spread (mV) of its row softmax over the
    samples the page shows, and a 0..1 confidence (0.5 at a spread of CONFIDENCE_HALF_MV). Leads read again in
    row bands have their band's spread (read_row_bands)."""
    spread = outputs['spread'] if 'spread' in outputs else ecg_decode.row_spread(outputs)
    shown = torch.from_numpy(np.stack([layout_mask(name) for name in found_layouts(outputs)])).to(spread.device)
    mean = (spread * shown).sum(-1) / shown.sum(-1).clamp(min=1)
    return mean.float().cpu().numpy(), (1 / (1 + mean / CONFIDENCE_HALF_MV)).float().cpu().numpy()


def found_layouts(outputs):
    """The layout name decoding found for each image of a batch."""
    return outputs['trace_rows'].get('layouts') or [ecg_decode.LAYOUT.name] * len(outputs['signal'])


def layout_mask(name=ecg_decode.LAYOUT.name):
    """(12, 5000) bool: which 500 Hz samples a page layout shows (on the standard page II: all 10 s via
    the rhythm strip; every other lead: its 2.5 s column)."""
    return LAYOUTS[name].shown_mask()


def shown_signal(signal, layout=ecg_decode.LAYOUT.name):
    """(12, 5000) model output in mV -> float64 copy with NaN where the page's layout does not show the lead."""
    return np.where(layout_mask(layout), signal.astype(np.float64), np.nan)


def page_rgb(page):
    """One page's (h, w, 3) uint8 RGB pixels (page_image.read_rgb, the toolkit's one reader)."""
    return page_image.read_rgb(page.path, page.index, page.dpi)


def find_page(rgb):
    """An image's page as the network reads it -> ((h, w, 3) RGB, what was done, for the sidecar): a photo's
    paper found and its perspective undone (page_rectify), its folds and curl taken out on its grid
    (page_flatten), then paper padding around the grid cut off (page_scale.crop_to_grid). A render or scan that
    needs none of this comes back as it is."""
    rectified = page_rectify.rectify(rgb)
    page, done = rectified.rgb, {'action': rectified.action}
    if rectified.homography is not None:
        flat = page_flatten.flatten(page, rectified.px_per_mm)
        page, done = flat.rgb, {**rectified.summary(), **flat.summary()}
    page, box = page_scale.crop_to_grid(page)
    if box is not None:
        done['grid_crop_xywh'] = [box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0]
    return page, done


def page_pixels(page):
    """One page (page_image.ImagePage) -> find_page's (RGB as read, what was done)."""
    return find_page(page_rgb(page))


def read_page(page, size_hw):
    """One page (page_image.ImagePage) -> (its model inputs (page_input_row) or None, problem or None)."""
    try:
        rgb, done = page_pixels(page)
        return page_input_row(rgb, size_hw, done), None
    except ecg_cli.InputError as exc:
        return None, str(exc)


def read_batch(paths, size_hw):
    """Read a batch of images here and now; unreadable ones are reported and left out (gather_pages)."""
    return gather_pages([(path, *read_page(path, size_hw)) for path in paths])


def read_batches(images, size_hw, batch_size, pool):
    """gather_pages' answer for each batch of images in turn, every page read on pool's threads as soon as one
    is free (decoding a PNG and reading its grid release the GIL), up to READ_AHEAD batches beyond the one
    yielded: a slow page (a long pulse search) no longer leaves the other thread idle at each batch's end."""
    upcoming, reading = iter(images), deque()

    def top_up():
        wanted = (READ_AHEAD + 1) * batch_size - len(reading)
        reading.extend((path, pool.submit(read_page, path, size_hw)) for path in islice(upcoming, wanted))

    top_up()
    while reading:
        batch = [reading.popleft() for _ in range(min(batch_size, len(reading)))]
        top_up()
        yield gather_pages([(path, *future.result()) for path, future in batch])


def gather_pages(pages):
    """[(path, read_page's row or None, problem or None)] -> (page_inputs or None, paths read, problems)."""
    rows = [row for _, row, _ in pages if row is not None]
    read = [path for path, row, _ in pages if row is not None]
    problems = [problem for _, _, problem in pages if problem is not None]
    return (stack_inputs(rows) if rows else None), read, problems


def page_input_row(rgb, size_hw, page_found=None):
    """(h, w, 3) uint8 RGB page -> (input tensor (3, H, W), page aspect, px_per_mv, px_per_s, scale found,
    paper share (paper_share), what finding the page did (find_page; None: not asked))."""
    tensor, picture, aspect = page_image.preprocess(rgb, size_hw)
    scale = page_scale.read_scale(rgb, size_hw, photo=rectified(page_found), grid=flattened_grid(page_found))
    return (tensor, aspect) + scale + (paper_share(picture, rgb), page_found)


def paper_share(picture, rgb):
    """Share of the input picture's pixels within PAPER_TOL of the page's paper colour: a page, or a photo of one
    on a desk, is mostly paper; noise and photos of other things are not."""
    paper = page_scale.paper_colour(rgb)
    distance = np.linalg.norm(picture.astype(np.float32) - paper, axis=2)
    return float((distance < PAPER_TOL).mean())


def stack_inputs(rows):
    """page_input_row's per page -> the model's inputs: image (B, 3, H, W), page_aspect, read_px_per_mv,
    read_px_per_s, read_speed_mm_s (B,; NaN: not read from the pulse), read_start (B,: input column where the
    pulses end and the traces start, NaN: no pulse) and 'scale', what each page's grid and pulse showed."""
    tensors, aspects, px_per_mv, px_per_s, found, paper, page_found = zip(*rows)
    speeds = [page_scale.pulse_reading(scale, 'paper_speed_mm_s', 'speed_assumed') for scale in found]
    return {'image': torch.stack(tensors), 'page_aspect': torch.tensor(aspects, dtype=torch.float32),
            'read_px_per_mv': torch.tensor(px_per_mv, dtype=torch.float32),
            'read_px_per_s': torch.tensor(px_per_s, dtype=torch.float32),
            'read_speed_mm_s': torch.tensor(speeds, dtype=torch.float32),
            'read_start': torch.tensor([scale['trace_start_column'] for scale in found], dtype=torch.float32),
            'scale': list(found), 'paper_share': list(paper), 'page_found': list(page_found)}


def flattened_grid(page_found):
    """The grid scale page_flatten read over a flattened photo's whole page (page_scale.KnownGrid), or None."""
    if not page_found or page_found.get('flatten') != 'flattened':
        return None
    px_per_mm_x, px_per_mm_y = page_found['flatten_px_per_mm']
    return page_scale.KnownGrid(px_per_mm_x, px_per_mm_y, page_found['flatten_sure_share'])


def rectified(page_found):
    """Whether find_page found a photo's paper and undid its perspective (page_found: what it did, or None)."""
    return bool(page_found) and page_found.get('action') == 'rectified'


def with_known_scale(inputs, size_hw, gain=None, speed=None):
    """--gain / --paper_speed: the page's gain and speed as the user knows them, over what its pulse showed
    (or the 10 mm/mV and 25 mm/s assumed without one). Scales read_px_per_mv and read_px_per_s to match;
    a page without a readable grid gets the page border's px per mV at that gain."""
    if gain:
        found = torch.tensor([scale['gain_mm_mv'] for scale in inputs['scale']], dtype=torch.float32)
        border = ecg_decode.default_px_per_mv(size_hw[0]) * gain / MM_PER_MV
        px_per_mv = inputs['read_px_per_mv'] * gain / found
        inputs['read_px_per_mv'] = torch.where(torch.isfinite(px_per_mv), px_per_mv, torch.full_like(px_per_mv, border))
    if speed:
        found = torch.tensor([scale['paper_speed_mm_s'] for scale in inputs['scale']], dtype=torch.float32)
        inputs['read_px_per_s'] = inputs['read_px_per_s'] * speed / found   # NaN stays NaN: the border's guess
        inputs['read_speed_mm_s'] = torch.full_like(found, speed)
    for scale in inputs['scale']:   # the sidecar tells what the user gave
        if gain:
            scale['gain_from_flag'] = gain
        if speed:
            scale['speed_from_flag'] = speed
    return inputs


def page_inputs(pages, size_hw, found=None):
    """(h, w, 3) uint8 RGB pages as find_page gave them -> the model's inputs (stack_inputs). found: find_page's
    what-was-done per page (None: pages as they are): a rectified photo's scale is read as inference reads it."""
    found = found or [None] * len(pages)
    return stack_inputs([page_input_row(rgb, size_hw, done) for rgb, done in zip(pages, found)])



def found_pixels(pages):
    """pixels for read_signals: page i of pages (page_image.ImagePage) as found_page finds it (inference.py)."""
    return lambda i: page_pixels(pages[i])[0]


def known_pixels(paths):
    """pixels for read_signals: the page file paths[i] with its padding cut off (page_scale.crop_to_grid), as
    production_dataset.build_sample reads a page whose simulator JSON gives its geometry (evaluation, validation):
    not rectified, since the JSON's coordinates are the file's."""
    return lambda i: page_scale.crop_to_grid(page_image.read_rgb(paths[i]))[0]
