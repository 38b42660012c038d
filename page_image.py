"""A page's pixels: the toolkit's one image reader (files in) and the one preprocessing to the network's input
(tensor out). Training, evaluation, inference and the page tools all read images here.

    read_rgb(path)           any image file or PDF page -> (h, w, 3) uint8 RGB, upright, or SampleError naming the file
    preprocess(rgb, (H, W))  -> ((3, H, W) ImageNet-normalized tensor, (H, W, 3) picture, page aspect w / h)
"""
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pypdfium2
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps

from ecg_cli import SampleError
from ecg_page import BAND_ROWS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.pdf')   # what a folder of pages is searched for
PDF_DPI = 200.0                    # a PDF page rasterized: 2200 x 1700 px for a letter page, as a 200 dpi scan
PDF_POINTS_PER_INCH = 72.0
MAX_PDF_PIXELS = Image.MAX_IMAGE_PIXELS   # a rasterized page may be as large as Pillow lets an image be
MIN_PAGE_SIDE = 128                # px: a 50 dpi letter page is 425 px tall; less cannot hold 13 strips
MIN_PAGE_CONTRAST = 2.0            # grey-level std: below it the image is one colour
BAND_MARGIN_PITCHES = 1.5         # a row band reaches this many row pitches above the page's top row (below its last)


@dataclass(frozen=True)
class ImagePage:
    """One page of an image file: a PNG or JPEG holds one, a TIFF or PDF may hold several (index counts from 0);
    a PDF page is rasterized at dpi."""
    path: Path
    index: int = 0
    count: int = 1
    dpi: float = PDF_DPI

    @property
    def name(self):
        """What the page's outputs are named by: the file's stem, with _p{page} on a file of several pages."""
        return self.path.stem if self.count == 1 else f'{self.path.stem}_p{self.index + 1}'

    def __str__(self):
        return str(self.path) if self.count == 1 else f'{self.path} page {self.index + 1}'


def is_pdf(path):
    """Whether a file is read as a PDF (its pages rasterized) rather than an image."""
    return Path(path).suffix.lower() == '.pdf'


def image_pages(path, pdf_dpi=PDF_DPI):
    """The pages of an image file (ImagePage each): every page of a multi-page TIFF or a PDF, else the one. A file
    that does not open is one page here; reading it names the problem (read_rgb)."""
    path = Path(path)
    if not (is_pdf(path) or path.suffix.lower() in ('.tif', '.tiff')):
        return [ImagePage(path)]
    try:
        if is_pdf(path):
            with closing(pypdfium2.PdfDocument(str(path))) as pdf:
                count = len(pdf)
        else:
            with Image.open(path) as image:
                count = getattr(image, 'n_frames', 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, pypdfium2.PdfiumError):
        count = 1
    count = max(count, 1)   # a PDF of no page is one page here; reading it says so
    return [ImagePage(path, k, count, pdf_dpi) for k in range(count)]


def read_rgb(path, page=0, pdf_dpi=PDF_DPI):
    """The toolkit's one image reader: any image Pillow reads (PNG, JPEG, TIFF and its pages, ...) -> (h, w, 3)
    uint8 RGB at its own size, turned as its EXIF orientation says (phone photos are stored on their side).
    Gray is repeated; RGBA is composited over white paper (a transparent page is paper, not black); 16-bit
    is scaled to 8; CMYK converted. A PDF page is rasterized at pdf_dpi (read_pdf_page). A truncated or corrupt
    file is refused (Pillow's strict loading: a JPEG cut short or with broken data would otherwise decode with a
    grey or smeared part), and so are images too small or too blank to be an ECG page, so nobody trains on them
    or reads a signal out of them."""
    where = f'{path}' if page == 0 else f'{path} page {page + 1}'
    if is_pdf(path):
        rgb = read_pdf_page(path, page, pdf_dpi, where)
        check_page_pixels(rgb, where)
        return rgb
    try:
        with Image.open(path) as image:
            if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
                rgb = strict_jpeg(path, image)
            else:
                image.seek(page)
                image.load()
                rgb = pillow_rgb(upright(image))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise SampleError(f'{where}: unreadable image, could not decode its pixels ({exc})') from exc
    check_page_pixels(rgb, where)
    return rgb


def read_pdf_page(path, page, dpi, where):
    """Page `page` of a PDF rasterized by PDFium at dpi on white paper -> (h, w, 3) uint8 RGB: an ECG machine's
    vector export comes out as a clean render, a scanned archive as the scan it holds. A page whose raster
    would exceed MAX_PDF_PIXELS is refused with the dpi that fits (a PDF may name any page size)."""
    try:
        with closing(pypdfium2.PdfDocument(str(path))) as pdf:
            if not 0 <= page < len(pdf):
                raise SampleError(f'{where}: the PDF has {len(pdf)} page(s)')
            pdf_page = pdf[page]
            width_in, height_in = (side / PDF_POINTS_PER_INCH for side in pdf_page.get_size())
            pixels = width_in * height_in * dpi ** 2
            if pixels > MAX_PDF_PIXELS:
                fits = math.floor(dpi * math.sqrt(MAX_PDF_PIXELS / pixels))
                raise SampleError(f'{where}: a {width_in:.1f} x {height_in:.1f} in page at {dpi:g} dpi is '
                                  f'{pixels / 1e6:.0f} Mpx, over the {MAX_PDF_PIXELS / 1e6:.0f} Mpx limit '
                                  f'(--pdf_dpi {fits} or less reads it)')
            image = pdf_page.render(scale=dpi / PDF_POINTS_PER_INCH, fill_color=(255, 255, 255, 255)).to_pil()
    except (pypdfium2.PdfiumError, OSError) as exc:
        raise SampleError(f'{where}: unreadable PDF ({exc})') from exc
    return np.asarray(image.convert('RGB'))


# Pillow's transposition for each EXIF orientation tag, as ImageOps.exif_transpose applies them
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def strict_jpeg(path, image):
    """An RGB or gray JPEG (opened by Pillow, for its EXIF) -> (h, w, 3) uint8 RGB, turned upright, decoded by
    libjpeg-turbo with its warnings as errors (simplejpeg strict): Pillow decodes a JPEG whose data was
    overwritten (4 KiB of zeros) without a word, as grey blocks. The same pixels as Pillow's, in half its time."""
    rgb = simplejpeg.decode_jpeg(Path(path).read_bytes(), colorspace='RGB', strict=True)
    turn = EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return rgb if turn is None else np.asarray(Image.fromarray(rgb).transpose(turn))


def upright(image):
    """A Pillow image turned as its EXIF orientation tag says (the tag is absent or 1 on most pages: no copy)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image


def pillow_rgb(image):
    """A loaded Pillow image of any mode -> (h, w, 3) uint8 RGB (over_white_paper where it has alpha)."""
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I'):    # 16-bit gray (and 32-bit integer TIFFs)
        gray = (np.clip(np.asarray(image, np.int64), 0, 65535) // 257).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        return over_white_paper(np.asarray(image.convert('RGBA')))
    if image.mode == 'L':
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_GRAY2RGB)
    return np.asarray(image if image.mode == 'RGB' else image.convert('RGB'))


def over_white_paper(rgba):
    """(h, w, 4) uint8 RGBA -> (h, w, 3) uint8 RGB composited over white. ecg-image-kit writes RGBA pages
    that are all opaque: those skip the float blend, which costs as much as decoding the PNG."""
    alpha = rgba[..., 3]
    if int(alpha.min()) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    weight = alpha[..., None].astype(np.float32) / 255.0
    return (rgba[..., :3] * weight + 255.0 * (1 - weight)).round().astype(np.uint8)


def pixel_std(rgb):
    """Standard deviation over all pixels and channels, from cv2's per-channel moments (a fraction of
    numpy's cost on a 2200 x 1700 page)."""
    mean, std = cv2.meanStdDev(rgb)
    return float(np.sqrt(np.mean(std ** 2 + mean ** 2) - np.mean(mean) ** 2))


def check_page_pixels(rgb, path):
    """An ECG page has some size and some ink: a 1x1 or one-colour image is a mistake, not a page."""
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_PAGE_SIDE:
        raise SampleError(f'{path}: image is {width}x{height} px, too small for an ECG page '
                          f'(at least {MIN_PAGE_SIDE} px a side)')
    if pixel_std(rgb) < MIN_PAGE_CONTRAST:
        raise SampleError(f'{path}: image is blank (one colour, no trace or grid to read)')


def resize_page(rgb, size_hw):
    """(h, w, 3) uint8 page -> (H, W, 3) uint8 at the network's input size; area interpolation keeps thin
    traces (a 1 px trace survives a 4x shrink as a grey line instead of vanishing between samples)."""
    return cv2.resize(rgb, (int(size_hw[1]), int(size_hw[0])), interpolation=cv2.INTER_AREA)


def normalize(picture):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor, ImageNet-normalized as the encoders expect."""
    image = (picture.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(image.transpose(2, 0, 1).copy())


def preprocess(rgb, size_hw):
    """The one path from a page to the network, for training, evaluation and inference:
    (h, w, 3) uint8 RGB -> ((3, H, W) input tensor, (H, W, 3) uint8 picture, page aspect w / h)."""
    picture = resize_page(rgb, size_hw)
    return normalize(picture), picture, rgb.shape[1] / rgb.shape[0]


def denormalize(image):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8 RGB for pictures."""
    array = image.detach().cpu().float().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(array * 255, 0, 255).astype(np.uint8)


def band_bounds(rows, band, height):
    """(first, end) image rows of a row band of a de-rotated 12-row page: rows (12,) the row (px) each place's
    trace runs at, top down. A band reaches to the trace of the row beyond each of its ends (a row pitch: its
    own rows' deflections that way stay whole), or BAND_MARGIN_PITCHES past its outer row at the page's top and
    bottom (the header and margins left out). Rows that are no 12-row page's (a misreading) are taken evenly
    spaced down the page."""
    rows = np.asarray(rows, np.float64)
    steps = np.diff(rows)
    if not (np.isfinite(rows).all() and (steps > 0).all() and rows[0] > 0 and rows[-1] < height):
        rows = (np.arange(len(rows)) + 1.5) * height / (len(rows) + 2)
        steps = np.diff(rows)
    pitch = float(np.median(steps))
    top, bottom = band * BAND_ROWS, band * BAND_ROWS + BAND_ROWS - 1
    first = rows[top - 1] if top > 0 else rows[0] - BAND_MARGIN_PITCHES * pitch
    end = rows[bottom + 1] if bottom + 1 < len(rows) else rows[-1] + BAND_MARGIN_PITCHES * pitch
    return max(0, int(math.floor(first))), min(int(height), int(math.ceil(end)) + 1)


def band_pixels(rgb, crop):
    """(h, w, 3) page -> the row band crop = (theta_deg, first, end) cuts from the page turned upright (about
    its centre, as derotate turns points; white beyond the page's corners)."""
    theta, first, end = crop
    if abs(theta) > 1e-6:
        h, w = rgb.shape[:2]
        turn = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), theta, 1.0)
        rgb = cv2.warpAffine(rgb, turn, (w, h), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    return np.ascontiguousarray(rgb[first:end])



def png_size(path):
    """(width, height) from the PNG header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as exc:
        raise SampleError(f'{path}: unreadable PNG ({exc})') from exc
