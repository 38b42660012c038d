"""A page's JSON (ecg-image-kit's, or the built-in simulator's, which writes the same keys plus layout, style,
gain and speed) read and checked: each lead's plotted pixels, sample range and trace channel, the grid, the
page's layout, gain and speed. Every problem is a SampleError naming the file.
"""
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import ecg_cli
import page_image
from ecg_page import LAYOUTS, LEADS, MAJOR_MM, MM_PER_MV, MM_PER_S, N_LEADS, N_RHYTHM, RHYTHM, page_layout

LAYOUT_NAMES = list(LAYOUTS)       # layout_id indexes this list; -1: a page no known layout draws
PLOTTED_MARGIN_PX = 2.0            # plotted pixels may sit this far outside the PNG (antialiasing, rounding)
MAX_OFF_PAGE_SHARE = 0.05          # share of a lead's plotted pixels that may fall off the page (clipped peaks)
PARSED_PAGES = 32                  # pages parse_page keeps (about 0.7 MB each at 1 kHz)


def read_json(path):
    if not path.is_file():
        raise ecg_cli.SampleError(f'{path}: JSON beside the PNG not found')
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ecg_cli.SampleError(f'{path}: malformed JSON ({exc})') from exc


def page_offset(meta, png_wh, path):
    """ecg-image-kit pads the PNG by pad_inches * dpi on every side without shifting the JSON."""
    width, height = int(meta['width']), int(meta['height'])
    if png_wh == (width, height):
        return 0.0
    pad = float(meta.get('pad_inches', 0) or 0) * float(meta.get('resolution', 0) or 0)
    if pad and png_wh == (round(width + 2 * pad), round(height + 2 * pad)):
        return pad
    raise ecg_cli.SampleError(f'{path}: PNG is {png_wh[0]}x{png_wh[1]} but its JSON says {width}x{height} '
                      f'(pad_inches={meta.get("pad_inches")})')


def trace_channels(leads, path):
    """Trace channel of each JSON lead entry: the lead's index, or a rhythm channel for a rhythm strip (a
    second entry of the same lead, told apart by its longer sample range): RHYTHM + k for the k-th rhythm
    strip from the top of the page."""
    channels, by_name = [], {}
    for i, entry in enumerate(leads):
        name = entry.get('lead_name')
        if name not in LEADS:
            raise ecg_cli.SampleError(f'{path}: unknown lead_name {name!r}')
        by_name.setdefault(name, []).append(i)
        channels.append(LEADS.index(name))
    rhythm = []
    for name, entries in by_name.items():
        if len(entries) > 2:
            raise ecg_cli.SampleError(f'{path}: lead {name} appears {len(entries)} times')
        if len(entries) == 2:
            lengths = [leads[i]['end_sample'] - leads[i]['start_sample'] for i in entries]
            rhythm.append(entries[int(np.argmax(lengths))])
    if len(rhythm) > N_RHYTHM:
        raise ecg_cli.SampleError(f'{path}: {len(rhythm)} rhythm strips (leads drawn twice); a page holds at most {N_RHYTHM}')
    for k, i in enumerate(sorted(rhythm, key=lambda i: mean_row(leads[i]))):
        channels[i] = RHYTHM + k
    return channels


def mean_row(entry):
    """Mean row of a JSON lead entry's plotted pixels ([row, col] pairs; inf where there are none)."""
    pixels = np.asarray(entry.get('plotted_pixels', []), np.float64).reshape(-1, 2)
    return float(pixels[:, 0].mean()) if len(pixels) else float('inf')


def parse_page(ref):
    """Read and check the JSON -> dict of page geometry in PNG pixel coordinates (x = col, y = row), its arrays
    read-only. The last PARSED_PAGES pages are kept (read_page), as long as their files are unchanged: a data set is
    checked before training, and a small one read again every epoch, and the JSON is most of a sample's reading."""
    return dict(read_page(str(ref.json), str(ref.png), float(ref.fs), int(ref.sig_len),
                          tuple(file_version(path) for path in (ref.json, ref.png))))


def file_version(path):
    """What tells one version of a file from another (an edit of the same size within one mtime tick changes its
    ctime; a copy over it, its inode), or None when there is no file."""
    if not path.is_file():
        return None
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@functools.lru_cache(maxsize=PARSED_PAGES)
def read_page(json_path, png_path, fs, sig_len, files):
    """parse_page's work, for one version (files: file_version of the JSON and the PNG) of a page's files."""
    page = checked_page(SimpleNamespace(json=Path(json_path), png=Path(png_path), fs=fs, sig_len=sig_len))
    for array in [page['lead_channel'], page['lead_sign'], page['rhythm_leads'], *(e['xy'] for e in page['entries']),
                  *(page['grid'].values() if page['grid'] else ())]:
        if isinstance(array, np.ndarray):
            array.flags.writeable = False                  # a caller that changed one would change the kept page
    return page


def checked_page(ref):
    """Read and check the JSON of ref (json, png, fs, sig_len) -> parse_page's dict."""
    meta = read_json(ref.json)
    missing = [k for k in ('width', 'height', 'x_grid', 'y_grid', 'leads') if k not in meta]
    if missing:
        raise ecg_cli.SampleError(f'{ref.json}: missing keys {missing}')
    json_fs = float(meta.get('sampling_frequency', ref.fs))
    if abs(json_fs - ref.fs) > 1e-6:
        raise ecg_cli.SampleError(f'{ref.json}: sampling_frequency {json_fs:g} disagrees with train.csv fs {ref.fs:g}')
    png_wh = page_image.png_size(ref.png)
    offset = page_offset(meta, png_wh, ref.png)
    leads = meta['leads']
    channels = trace_channels(leads, ref.json)
    entries = []
    for channel, entry in zip(channels, leads):
        start, end = int(entry['start_sample']), int(entry['end_sample'])
        pixels = np.asarray(entry.get('plotted_pixels', []), np.float64).reshape(-1, 2)
        if len(pixels) != end - start:
            raise ecg_cli.SampleError(f'{ref.json}: lead {entry["lead_name"]} has {len(pixels)} plotted_pixels '
                              f'for samples [{start}, {end})')
        if end > ref.sig_len or start < 0:
            raise ecg_cli.SampleError(f'{ref.json}: lead {entry["lead_name"]} samples [{start}, {end}) outside '
                              f'the signal of {ref.sig_len} rows')
        xy = pixels[:, ::-1] + offset   # JSON gives [row, col]
        check_inside(xy, png_wh, ref.json, entry['lead_name'])
        entries.append(dict(channel=channel, lead=LEADS.index(entry['lead_name']),
                            start=start, end=end, xy=xy))
    rotation = meta.get('rotation_deg')
    grid = None
    if 'grid_origin' in meta and meta.get('gridlines', True):
        grid = dict(origin_xy=np.array(meta['grid_origin'][::-1], np.float64) + offset,
                    center_xy=np.array(meta.get('rotation_center', [meta['height'] / 2, meta['width'] / 2])[::-1],
                                       np.float64) + offset,
                    spacing=float(meta['x_grid']))
    rhythm_leads = np.full(N_RHYTHM, -1, np.int64)
    for e in (e for e in entries if e['channel'] >= RHYTHM):
        rhythm_leads[e['channel'] - RHYTHM] = e['lead']
    strips = [(LEADS[e['lead']], e['start'] / ref.fs, (e['end'] - 1) / ref.fs, e['channel'] >= RHYTHM) for e in entries]
    # y_grid is the 5 mm square in px; gain and speed are 10 mm/mV and 25 mm/s unless the JSON says otherwise
    gain, speed = float(meta.get('gain_mm_mv', MM_PER_MV)), float(meta.get('paper_speed_mm_s', MM_PER_S))
    layout = page_layout(strips, speed, meta.get('layout'))
    lead_channel, lead_sign = LAYOUTS[layout].lead_channels() if layout else (np.arange(N_LEADS), np.ones(N_LEADS))
    for entry in (e for e in entries if e['channel'] < RHYTHM):   # a channel is a place: on a Cabrera page
        entry['channel'] = int(lead_channel[entry['lead']])          # aVL is read where the standard page draws I
        entry['sign'] = float(lead_sign[entry['lead']])
    return dict(entries=entries, lead_channel=lead_channel, lead_sign=lead_sign,
                px_per_mv=gain / MAJOR_MM * float(meta['y_grid']), gain_mm_mv=gain, paper_speed_mm_s=speed,
                rhythm_leads=rhythm_leads, layout_id=LAYOUT_NAMES.index(layout) if layout else -1,
                rotation_deg=None if rotation is None else float(rotation),
                grid=grid, has_grid_info='grid_origin' in meta, style=meta.get('style') or kit_style(meta))


def kit_style(meta):
    """An ecg-image-kit page's look, named from its JSON's switches (it writes no style name), so reports can
    be broken down per style: 'eik' plus e.g. '+augment+wrinkles+header', or 'eik-plain'."""
    switches = [('augment', meta.get('augment')), ('wrinkles', meta.get('wrinkles')),
                ('header', meta.get('printed_text')), ('bw', meta.get('bw')),
                ('nogrid', meta.get('gridlines') is False), ('padded', float(meta.get('pad_inches') or 0) > 0)]
    names = [name for name, on in switches if on]
    return 'eik+' + '+'.join(names) if names else 'eik-plain'


def check_inside(xy, png_wh, path, lead):
    """Plotted pixels must lie on the image: a lead mostly off it belongs to another image or size. A few
    off the edge are real (ecg-image-kit clips a large deflection or a rotated strip at the page edge)."""
    finite = xy[np.isfinite(xy).all(axis=1)]
    low, high = -0.5 - PLOTTED_MARGIN_PX, np.asarray(png_wh) - 0.5 + PLOTTED_MARGIN_PX
    outside = ((finite < low) | (finite > high)).any(axis=1)
    if len(outside) and outside.mean() > MAX_OFF_PAGE_SHARE:
        x, y = finite[np.argmax(outside)]
        raise ecg_cli.SampleError(f'{path}: lead {lead} has {int(outside.sum())} of {len(outside)} plotted_pixels outside '
                          f'the {png_wh[0]}x{png_wh[1]} image (e.g. row {y:.0f}, col {x:.0f})')


def layout_name(layout_id):
    return LAYOUT_NAMES[int(layout_id)] if int(layout_id) >= 0 else None
