"""Picture of what a checkpoint sees and predicts on one ECG image, with the truth when it is known.

    python visualize.py --image test.png --checkpoint best.pth
    python visualize.py --image test.png --checkpoint best.pth --output out.png --csv truth.csv --fs 500

Top: the input image at the model's input size (upscaled when small) with the predicted lead mask (lead
colours, semi-transparent), the predicted 0 mV lines (green) and the traces the signal head reads.
Below: one small plot per lead, in the page's 3 x 4 arrangement, of the predicted signal in mV over the
seconds the image shows it (II: all 10 s), the truth over it in black and Pearson r in the title.
A phone photo whose page was found and rectified is shown as taken, the page's outline drawn on it, left of
the rectified page the model read (flattened on its grid: page_flatten). Truth comes from --csv, or by itself
when the image sits in the Kaggle layout (OUT/{id}/{id}-0001.png beside OUT/{id}/{id}.csv, with OUT/train.csv). Writes
{image_stem}_visualization.png beside the image unless --output says otherwise.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use('Agg')   # files only: no display on servers and in tests
import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import ecg_cli
import ecg_decode
import ecg_signals
import ecg_trainer
import page_image
import page_json
import page_reader
import page_rectify
import production_dataset as pdx
from ecg_page import FS, LAYOUTS, LEADS, N_SAMPLES, SECONDS

MIN_PANEL_WIDTH = 1200         # px: a 320 px wide input is upscaled x4 to stay legible
FIGURE_WIDTH_IN = 16
MAX_PANEL_HEIGHT_IN = 7
LEAD_ROW_HEIGHT_IN = 2.2
DPI = 100
PANEL_GAP_PX = 16              # white between the photo as found and the page the model read
OUTLINE_HEIGHTS = 60           # the outline on the photo is 1/60 of its panel's height: it stays seen when shrunk
SEG_ALPHA = 0.45               # lead mask over the image: enough to see, not enough to hide the trace
BASELINE_COLOUR = np.array([0, 200, 0])
BASELINE_ALPHA = 0.7           # an untrained model's 0 mV map can cover the page: keep the image visible
SEG_MIN_PROB = 0.5             # colour only pixels the model is fairly sure belong to a lead


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Draw what a checkpoint predicts on one ECG image.')
    parser.add_argument('--image', required=True, type=Path, help='PNG or JPEG of an ECG page')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='a trained .pth (e.g. checkpoints/best.pth); default: the shipped starter weights '
                             '(starter/MODEL_CARD.md says what they read and how they were made)')
    parser.add_argument('--output', type=Path, help='PNG to write (default: {image_stem}_visualization.png beside '
                                                    'the image)')
    parser.add_argument('--csv', type=Path, help='true signal, a Kaggle signal CSV (columns I..V6 in mV)')
    parser.add_argument('--fs', type=float, help='sampling rate of --csv in Hz (default: from a JSON beside the '
                                                 'image, else train.csv two levels up, else rows / 10 s)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
                        help='auto: CUDA, else MPS, else CPU')
    return parser.parse_args(argv)


# ---------------------------------------------------------------- truth

def record_id(image_path):
    """Kaggle / ecg-image-kit image names are {id}-{k}.png."""
    return image_path.stem.rsplit('-', 1)[0]


def find_truth_csv(image_path):
    """OUT/{id}/{id}.csv beside OUT/{id}/{id}-k.png, or None."""
    path = image_path.parent / f'{record_id(image_path)}.csv'
    return path if path.is_file() else None


def truth_fs(csv_path, image_path, n_rows, given_fs):
    """(fs, where it came from): --fs, the image's JSON, train.csv two levels up, else rows / 10 s."""
    if given_fs:
        return given_fs, '--fs'
    json_path = image_path.with_suffix('.json')
    if json_path.is_file():
        fs = page_json.read_json(json_path).get('sampling_frequency')
        if fs:
            return float(fs), json_path.name
    train_csv = image_path.parent.parent / 'train.csv'
    if train_csv.is_file():
        records = ecg_signals.read_train_csv(train_csv.parent)
        if csv_path.stem in records:
            return records[csv_path.stem][0], str(train_csv)
    return n_rows / SECONDS, 'rows / 10 s'   # Kaggle signals are 10 s long


def load_truth(csv_path, image_path, given_fs):
    """Kaggle signal CSV -> ((12, 5000) mV at 500 Hz with NaN where not recorded, description)."""
    n_rows = len(pd.read_csv(csv_path, usecols=[0]))
    fs, source = truth_fs(csv_path, image_path, n_rows, given_fs)
    return ecg_signals.load_signal(csv_path, fs, n_rows), f'{csv_path} at {fs:g} Hz (fs from {source})'


def resolve_truth(args):
    """(truth (12, 5000) or None, description). An explicit --csv must load; one found by itself may fail
    quietly (with a note), since the picture is still useful without it."""
    if args.csv is not None:
        if not args.csv.is_file():
            raise ecg_cli.InputError(f'{args.csv}: truth CSV not found')
        try:
            return load_truth(args.csv, args.image, args.fs)
        except (ecg_cli.SampleError, ValueError) as exc:
            raise ecg_cli.InputError(f'{args.csv}: cannot use as truth ({exc})') from exc
    found = find_truth_csv(args.image)
    if found is None:
        return None, 'none (no --csv, and no {id}.csv beside the image)'
    try:
        return load_truth(found, args.image, args.fs)
    except (ecg_cli.SampleError, ValueError) as exc:
        return None, f'none ({found} unusable: {exc})'


def pearson(pred, truth, layout):
    """pred (12, 5000), truth (12, 5000) with NaN -> (12,) r over the samples the image shows (its layout,
    a LAYOUTS name) and the truth has."""
    mask = page_reader.layout_mask(layout) & np.isfinite(truth)
    r = ecg_trainer.pearson_per_lead(torch.from_numpy(pred)[None], torch.from_numpy(np.nan_to_num(truth))[None],
                                     torch.from_numpy(mask)[None])
    return r[0].numpy()


# ---------------------------------------------------------------- pictures

def overlay_panel(picture, outputs, page_aspect):
    """(H, W, 3) uint8 input picture -> the same with the seg mask (lead colours, blended), the 0 mV lines
    (green) and the traces the signal head reads (draw_prediction) on it, upscaled for legibility."""
    panel = picture.astype(np.float32)
    prob = outputs['seg'][0].float().softmax(0)
    label = prob.argmax(0).cpu().numpy()
    sure = (label > 0) & (prob.amax(0).cpu().numpy() > SEG_MIN_PROB)
    panel[sure] = (1 - SEG_ALPHA) * panel[sure] + SEG_ALPHA * pdx.LEAD_COLOURS[label[sure]]
    baseline = outputs['baseline'][0, 0].float().sigmoid().cpu().numpy() > 0.5
    panel[baseline] = (1 - BASELINE_ALPHA) * panel[baseline] + BASELINE_ALPHA * BASELINE_COLOUR
    panel = ecg_decode.draw_prediction(panel.round().astype(np.uint8), outputs, 0, page_aspect=page_aspect)
    scale = max(1, -(-MIN_PANEL_WIDTH // panel.shape[1]))
    # nearest keeps each input pixel a crisp block: the picture shows exactly what the model saw
    return cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def found_panel(photo, page_found, height):
    """A photo whose page was found and rectified (page_reader.find_page) as read, with the page's outline drawn
    on it, `height` px tall; None for an image read as it is. Shown left of the rectified page, so a person sees
    at a glance whether the paper was found where it lies."""
    if page_found['action'] != 'rectified':   # find_page keeps the corners of rectified pages only
        return None
    corners = page_found['corners_xy']
    shrink = height / photo.shape[0]
    small = cv2.resize(photo, (round(photo.shape[1] * shrink), height), interpolation=cv2.INTER_AREA)
    return page_rectify.draw_corners(small, np.asarray(corners) * shrink, rectified=True,
                                     thickness=max(3, height // OUTLINE_HEIGHTS))


def beside(found, overlay):
    """The found panel (or None) left of the overlay panel, a white gap between them."""
    if found is None:
        return overlay
    gap = np.full((overlay.shape[0], PANEL_GAP_PX, 3), 255, np.uint8)
    return np.hstack([found, gap, overlay])


def lead_axes(figure, grid_spec, layout):
    """12 (axis, row, column) in LEADS order, placed as the page shows them (I aVR V1 V4 / II aVL V2 V5 / ...)."""
    axes = []
    for row, leads in enumerate(LAYOUTS[layout].rows):
        for column, lead in enumerate(leads):
            axes.append((LEADS.index(lead), figure.add_subplot(grid_spec[1 + row, column]), row, column))
    return [(ax, row, column) for _, ax, row, column in sorted(axes, key=lambda item: item[0])]


def plot_lead(ax, lead, pred, truth, r, confidence, layout):
    """One lead: the predicted mV over the seconds the image shows it, the truth over it when known, and
    in the title r and the signal head's confidence (page_reader.lead_confidence)."""
    t = np.arange(N_SAMPLES) / FS
    shown = page_reader.layout_mask(layout)[lead]
    colour = np.array(ecg_decode.TRACE_COLOURS[lead]) / 255
    if truth is not None:
        ax.plot(t, np.where(shown, truth[lead], np.nan), color='black', lw=0.8, label='truth')
    ax.plot(t, np.where(shown, pred[lead], np.nan), color=colour, lw=0.8, label='predicted')
    ax.set_xlim(t[shown][0], t[shown][-1])
    title = LEADS[lead] + ('' if r is None else f'   r = {r:.2f}' if np.isfinite(r) else '   r = n/a')
    title += f'   confidence {confidence:.2f}'
    ax.set_title(title, fontsize=9, loc='left')
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def scale_note(scale):
    """The scale the page showed, in words for the title."""
    if scale['source'] is None:
        return 'scale: none found on the page (page border used)'
    gain = f"{scale['gain_mm_mv']:g} mm/mV" + (' (assumed)' if scale['gain_assumed'] else '')
    speed = f"{scale['paper_speed_mm_s']:g} mm/s" + (' (assumed)' if scale['speed_assumed'] else '')
    return f"scale from the {scale['source']}: {scale['px_per_mm_x']:.2f} px/mm, {gain}, {speed}"


def draw_figure(panel, pred, truth, r, confidence, title, path, layout=ecg_decode.LAYOUT.name):
    """Top: the overlay panel; below: the lead plots (mV vs s) placed as the page's layout places them
    (3 x 4 on the standard page). Written as PNG to path."""
    panel_in = min(FIGURE_WIDTH_IN * panel.shape[0] / panel.shape[1], MAX_PANEL_HEIGHT_IN)
    n_rows = len(LAYOUTS[layout].rows)
    figure = plt.figure(figsize=(FIGURE_WIDTH_IN, panel_in + n_rows * LEAD_ROW_HEIGHT_IN + 0.5), dpi=DPI,
                        layout='constrained')
    grid_spec = figure.add_gridspec(1 + n_rows, LAYOUTS[layout].n_columns,
                                    height_ratios=[panel_in] + [LEAD_ROW_HEIGHT_IN] * n_rows)
    top = figure.add_subplot(grid_spec[0, :])
    top.imshow(panel)
    top.set_axis_off()
    for lead, (ax, row, column) in enumerate(lead_axes(figure, grid_spec, layout)):
        plot_lead(ax, lead, pred, truth, None if r is None else r[lead], confidence[lead], layout)
        if column == 0:
            ax.set_ylabel('mV', fontsize=8)
        if row == n_rows - 1:
            ax.set_xlabel('s', fontsize=8)
    figure.axes[1].legend(fontsize=7, loc='upper right')
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches='tight')
    plt.close(figure)


# ---------------------------------------------------------------- driving

def predict(args):
    """-> (model outputs for the one image, the (H, W, 3) picture the model saw, the page aspect, the image as
    read)."""
    if not args.image.is_file():
        raise ecg_cli.InputError(f'{args.image}: image not found')
    photo = page_image.read_rgb(args.image)
    rgb, page_found = page_reader.find_page(photo)   # the page as inference reads it
    device = page_reader.pick_device(args.device)
    args.checkpoint = page_reader.checkpoint_path(args.checkpoint)
    reader = page_reader.open_reader(args.checkpoint, device)
    size_hw = reader.size_hw
    inputs = page_reader.page_inputs([rgb], size_hw, [page_found])
    outputs = page_reader.read_signals(reader, inputs, lambda i: rgb)
    outputs['spread_mv'], outputs['confidence'] = page_reader.lead_confidence(outputs)
    outputs['scale'], outputs['page_found'] = inputs['scale'][0], page_found
    return outputs, page_image.resize_page(rgb, size_hw), float(inputs['page_aspect'][0]), photo


def page_note(page_found):
    """What finding the page did, for the title: a photo's page rectified, padding cut, or nothing."""
    notes = []
    if page_found['action'] == 'rectified':
        notes.append(f"page found and rectified (outline fit {page_found['fit_px']:.1f} px)")
    if page_found.get('flatten') == 'flattened':
        notes.append(f"flattened on its grid (shifts up to {page_found['flatten_shift_mm']:.1f} mm, "
                     f"residual {page_found['flatten_residual_mm']:.2f} mm)")
    if 'grid_crop_xywh' in page_found:
        notes.append('padding around the grid cut off')
    return ''.join(f'   {note}' for note in notes)


def main(argv=None):
    args = parse_args(argv)
    truth, truth_note = resolve_truth(args)
    outputs, picture, aspect, photo = predict(args)
    pred = outputs['signal'][0].float().cpu().numpy()
    layout = page_reader.found_layouts(outputs)[0]
    r = None if truth is None else pearson(pred, truth, layout)
    theta = float(outputs['decode_theta'][0])
    title = f'{args.image.name}   checkpoint {args.checkpoint.name}   layout {layout}   rotation {theta:+.2f} deg   ' + \
        scale_note(outputs['scale']) + page_note(outputs['page_found'])
    if r is not None and np.isfinite(r).any():
        title += f'   mean Pearson r {np.nanmean(r):.3f}'
    output = args.output or args.image.with_name(f'{args.image.stem}_visualization.png')
    overlay = overlay_panel(picture, outputs, aspect)
    panel = beside(found_panel(photo, outputs['page_found'], overlay.shape[0]), overlay)
    draw_figure(panel, pred, truth, r, outputs['confidence'][0], title, output, layout)
    print(f'page: {page_note(outputs["page_found"]).strip() or "read as it is"}')
    print(f'truth: {truth_note}')
    if r is not None:
        print('Pearson r per lead: ' + ' '.join(f'{lead} {v:.3f}' for lead, v in zip(LEADS, r)))
    print(f'wrote {output}')


if __name__ == '__main__':
    ecg_cli.run_cli(main)
