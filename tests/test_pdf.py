"""PDF in: every page of a PDF is read as an image, rasterized at --pdf_dpi. A scanned archive (raster pages) and
an ECG machine's vector export each read as well as the page they hold; a broken PDF is one line naming it."""
import json
import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ecg_signals
import ecg_trainer
import page_image
from conftest import classic_pages, run_cli, run_in_process

matplotlib.use('Agg')


def vector_pdf(json_path, pdf_path):
    """A one-page vector PDF of a simulator page, drawn from its JSON as an ECG machine exports one: the 1 and
    5 mm grid and every lead's trace as paths (no raster), on a page of the PNG's size in inches."""
    import matplotlib.pyplot as plt
    meta = json.loads(json_path.read_text())
    width, height, dpi = meta['width'], meta['height'], meta['resolution']
    figure = plt.figure(figsize=(width / dpi, height / dpi))
    axes = figure.add_axes([0, 0, 1, 1])
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.axis('off')
    origin_row, origin_col = meta['grid_origin']
    for step, colour, line_width in ((meta['x_grid'] / 5, '#f4b6b6', 0.3), (meta['x_grid'], '#e06060', 0.6)):
        for x in np.arange(origin_col % step, width, step):
            axes.axvline(x, color=colour, lw=line_width)
        for y in np.arange(origin_row % step, height, step):
            axes.axhline(y, color=colour, lw=line_width)
    for lead in meta['leads']:
        row_col = np.asarray(lead['plotted_pixels'], float)
        axes.plot(row_col[:, 1], row_col[:, 0], color='black', lw=0.8)
    figure.savefig(pdf_path)
    plt.close(figure)


def scores(reading_csv, record_dir):
    """{pearson, snr_db} of a reading (inference's CSV at 500 Hz) against the record's true signal."""
    record_id = record_dir.name
    table = pd.read_csv(record_dir.parent / 'train.csv', dtype={'id': str}).set_index('id')
    truth = torch.from_numpy(ecg_signals.load_signal(record_dir / f'{record_id}.csv', float(table.loc[record_id, 'fs']),
                                                     int(table.loc[record_id, 'sig_len'])))[None]
    reading = torch.from_numpy(pd.read_csv(reading_csv).to_numpy(np.float32).T)[None]
    shown = torch.isfinite(truth) & torch.isfinite(reading)
    stats = ecg_trainer.record_stats(torch.nan_to_num(reading), torch.nan_to_num(truth), shown)
    return {name: float(value[0]) for name, value in ecg_trainer.per_record(stats).items()}


@pytest.fixture(scope='module')
def pdf_readings(tmp_path_factory):
    """Two simulator pages (100 dpi) as PNGs, as one scanned two-page PDF, and the first as a vector PDF, all
    read by one inference.py run over their folder."""
    root = tmp_path_factory.mktemp('pdf')
    data = classic_pages(root / 'data', 2, 21)
    pngs = sorted(data.glob('*/*-0001.png'))
    pages = root / 'pages'
    pages.mkdir()
    for png in pngs:
        shutil.copy(png, pages / png.name)
    scans = [Image.open(png).convert('RGB') for png in pngs]
    scans[0].save(pages / 'scan.pdf', save_all=True, append_images=scans[1:], resolution=100.0)
    vector_pdf(pngs[0].with_suffix('.json'), pages / 'vector.pdf')
    run_cli('inference.py', '--image', pages, '--output', root / 'out')
    return root / 'out', [png.parent for png in pngs]


def test_a_scanned_pdf_reads_each_page_as_the_image_it_holds(pdf_readings):
    out, records = pdf_readings
    for k, record in enumerate(records, start=1):
        png = scores(out / f'{record.name}-0001.csv', record)
        pdf = scores(out / f'scan_p{k}.csv', record)
        assert png['snr_db'] > 8 and pdf['snr_db'] > png['snr_db'] - 1.0, (png, pdf)
        assert pdf['pearson'] > png['pearson'] - 0.02, (png, pdf)
        sidecar = json.loads((out / f'scan_p{k}.json').read_text())
        assert sidecar['image'].endswith('scan.pdf') and (sidecar['page'], sidecar['pages']) == (k, 2)
        assert sidecar['pdf_dpi'] == 200 and sidecar['scale']['px_per_mm_x'] == pytest.approx(200 / 25.4, rel=0.03)


def test_a_vector_pdf_reads_like_the_render_it_was_drawn_from(pdf_readings):
    out, records = pdf_readings
    png = scores(out / f'{records[0].name}-0001.csv', records[0])
    vector = scores(out / 'vector.csv', records[0])
    assert vector['snr_db'] > png['snr_db'] - 2.0 and vector['pearson'] > 0.9, (png, vector)
    sidecar = json.loads((out / 'vector.json').read_text())
    assert sidecar['image'].endswith('vector.pdf') and 'page' not in sidecar and sidecar['pdf_dpi'] == 200


def test_a_pdf_is_rasterized_at_the_dpi_asked(tmp_path):
    """A letter page at 100 and 200 dpi: 1100 x 850 and 2200 x 1700 px; a page too large for the pixel limit is
    refused with the dpi that reads it."""
    page = np.full((850, 1100, 3), 255, np.uint8)
    page[::20] = (230, 120, 120)
    Image.fromarray(page).save(tmp_path / 'letter.pdf', resolution=100.0)
    assert page_image.read_rgb(tmp_path / 'letter.pdf', 0, 100).shape == (850, 1100, 3)
    assert page_image.read_rgb(tmp_path / 'letter.pdf', 0, 200).shape == (1700, 2200, 3)
    too_large = r'letter.pdf: a 11.0 x 8.5 in page at 1200 dpi .*--pdf_dpi 978 or less'
    with pytest.raises(page_image.SampleError, match=too_large):
        page_image.read_rgb(tmp_path / 'letter.pdf', 0, 1200)
    assert [str(p) for p in page_image.image_pages(tmp_path / 'letter.pdf')] == [str(tmp_path / 'letter.pdf')]


@pytest.mark.parametrize('content', [b'%PDF-1.4\n1 0 obj garbage', b'not a pdf at all'])
def test_a_broken_pdf_is_one_line_naming_it(tmp_path, content):
    (tmp_path / 'broken.pdf').write_bytes(content)
    result = run_in_process('inference.py', '--image', tmp_path / 'broken.pdf', '--output', tmp_path / 'x.csv')
    assert result.returncode == 1
    assert 'broken.pdf: unreadable PDF' in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'x.csv').exists()


def test_pdf_dpi_out_of_range_is_refused(tmp_path):
    result = run_in_process('inference.py', '--image', tmp_path, '--output', tmp_path / 'x.csv', '--pdf_dpi', '5000')
    assert result.returncode == 2 and '--pdf_dpi' in result.stderr and 'between 36 and 1200' in result.stderr
