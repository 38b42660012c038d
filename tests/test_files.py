"""Files people have, through the real CLIs with the shipped starter: phone JPEGs stored on their side (EXIF),
truncated and corrupt JPEGs, multi-page TIFFs, images that are not ECGs, a page scanned huge, an --output that
cannot be written, and a bad file in a tiny training set. Each is read right or named in one line, never read as
a made-up signal."""
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import page_image
import production_dataset as pdx
from conftest import classic_pages, run_cli
from test_hardening import TINY, one_line_error


def pearson(a, b):
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[finite], b[finite])[0, 1])


def reading(out, name):
    return pd.read_csv(out / f'{name}.csv').to_numpy(), json.loads((out / f'{name}.json').read_text())


def blank_scan(rng, shape=(850, 1100)):
    """Off-white paper with scanner noise and a slight gradient: no ink at all."""
    ramp = np.linspace(0, 8, shape[1], dtype=np.float32)[None, :, None]
    page = 238 + ramp + rng.normal(0, 3, shape + (3,))
    return np.clip(page, 0, 255).astype(np.uint8)


def text_page(shape=(850, 1100)):
    page = np.full(shape + (3,), 250, np.uint8)
    for row, y in enumerate(range(70, shape[0] - 40, 34)):
        cv2.putText(page, f'{row:02d} patient seen today, no chest pain, blood pressure stable; follow up',
                    (50, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (20, 20, 20), 2, cv2.LINE_AA)
    return page


@pytest.fixture(scope='module')
def files(sim_data, tmp_path_factory):
    """A folder of what people have, made from two simulator pages (p, q) and read in one run of inference.py:
    plain.png (p), upright.jpg (p), phone.jpg (p stored turned 90 degrees, EXIF 'rotate 90'), two.tiff (p, q),
    cut.jpg (the first 40 % of upright.jpg), corrupt.jpg and zeroed.jpg (4 KiB of upright.jpg overwritten with
    random bytes, with zeros), blank.png, noise.png,
    text.png."""
    root = tmp_path_factory.mktemp('files')
    p, q = (page_image.read_rgb(png) for png in sorted(sim_data.glob('*/*-0001.png'))[:2])
    Image.fromarray(p).save(root / 'plain.png')
    Image.fromarray(p).save(root / 'upright.jpg', quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                                       # 'rotate 90 clockwise to show'
    Image.fromarray(np.ascontiguousarray(np.rot90(p))).save(root / 'phone.jpg', quality=95, exif=exif)
    Image.fromarray(p).save(root / 'two.tiff', save_all=True, append_images=[Image.fromarray(q)],
                            compression='tiff_lzw')
    jpeg = (root / 'upright.jpg').read_bytes()
    (root / 'cut.jpg').write_bytes(jpeg[:int(len(jpeg) * 0.4)])
    rng = np.random.default_rng(31)
    middle = len(jpeg) // 2
    (root / 'corrupt.jpg').write_bytes(jpeg[:middle] + rng.integers(0, 256, 4096, np.uint8).tobytes()
                                       + jpeg[middle + 4096:])
    (root / 'zeroed.jpg').write_bytes(jpeg[:middle] + bytes(4096) + jpeg[middle + 4096:])   # Pillow reads it
    Image.fromarray(blank_scan(rng)).save(root / 'blank.png')
    Image.fromarray(rng.integers(0, 256, (850, 1100, 3), np.uint8)).save(root / 'noise.png')
    Image.fromarray(text_page()).save(root / 'text.png')
    out = tmp_path_factory.mktemp('files_out')
    result = run_cli('inference.py', '--image', root, '--output', out, check=False)
    return root, out, result


def test_phone_jpeg_is_read_the_way_its_exif_turns_it(files):
    _, out, _ = files
    phone, report = reading(out, 'phone')
    upright, upright_report = reading(out, 'upright')
    assert report['layout'] == upright_report['layout']
    assert report['rotation_deg'] == pytest.approx(upright_report['rotation_deg'], abs=0.5)   # not 90 off
    assert pearson(phone, upright) > 0.95


def test_every_tiff_page_gets_its_csv_named_by_page(files):
    _, out, result = files
    first, report = reading(out, 'two_p1')
    second, _ = reading(out, 'two_p2')
    assert (report['page'], report['pages']) == (1, 2) and report['image'].endswith('two.tiff')
    png, _ = reading(out, 'plain')
    np.testing.assert_array_equal(first, png)            # lossless: page 1 is plain.png's pixels
    assert pearson(first, second) < 0.9                  # page 2 is another page, not page 1 again
    assert 'two.tiff page 2 ->' in result.stdout


def test_broken_jpegs_and_non_ecg_images_are_named_in_one_line_without_csv(files):
    root, out, result = files
    line = one_line_error(result, '6 image(s) not read')
    cut = line.split(f'{root / "cut.jpg"}: unreadable image')[1].split(';')[0]
    assert 'truncated' in cut or 'premature end' in cut.lower(), line
    assert f'{root / "corrupt.jpg"}: unreadable image' in line
    assert f'{root / "zeroed.jpg"}: unreadable image' in line and 'Corrupt JPEG data' in line
    for name in ('blank', 'noise', 'text'):
        assert f'{root / name}.png: does not look like an ECG' in line
    written = sorted(p.stem for p in out.glob('*.csv'))
    assert written == ['phone', 'plain', 'two_p1', 'two_p2', 'upright'], written
    assert not [p for p in out.iterdir() if p.name.startswith('.')], 'no partial file left'
    assert 'wrote 5 signal(s)' in result.stdout


def test_force_reads_a_non_ecg_image_with_a_warning(files, tmp_path):
    root, _, _ = files
    result = run_cli('inference.py', '--image', root / 'noise.png', '--output', tmp_path / 'noise.csv', '--force')
    assert 'does not look like an ECG' in result.stderr
    report = json.loads((tmp_path / 'noise.json').read_text())
    assert 'read because of --force' in report['warning'] and not report['ecg_evidence']['scale_found']
    assert len(pd.read_csv(tmp_path / 'noise.csv')) == 5000


def test_an_output_that_cannot_be_written_is_found_before_the_model_runs(sim_data, tmp_path):
    """A path under a regular file: no folder can be made there, root or not."""
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('a file, not a folder')
    image = sorted(sim_data.glob('*/*-0001.png'))[0]
    for output in (f'{blocker}/signals/', f'{blocker}/x.csv'):
        result = run_cli('inference.py', '--image', image, '--output', output, check=False)
        one_line_error(result, '--output', f'{blocker} is a file, not a folder')
        assert 'digitizing' not in result.stderr and 'wrote' not in result.stdout
    assert blocker.read_text() == 'a file, not a folder'


@pytest.fixture(scope='module')
def huge(tmp_path_factory):
    """A 200 dpi simulator page (2200 px wide) and the same page upscaled 3.6x to 8000 px, read in one run."""
    data = classic_pages(tmp_path_factory.mktemp('page200'), 1, 5, dpi=200)
    rgb = page_image.read_rgb(next(data.glob('*/*-0001.png')))
    root = tmp_path_factory.mktemp('huge')
    Image.fromarray(rgb).save(root / 'page.png')
    width = 8000
    big = cv2.resize(rgb, (width, round(width * rgb.shape[0] / rgb.shape[1])), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(big).save(root / 'huge.png', compress_level=1)
    out = tmp_path_factory.mktemp('huge_out')
    run_cli('inference.py', '--image', root, '--output', out)
    return rgb.shape, big.shape, out


def test_a_huge_page_reads_the_same_gain_speed_and_signal(huge):
    small_shape, big_shape, out = huge
    assert small_shape[1] == 2200 and big_shape[1] == 8000
    page, page_report = reading(out, 'page')
    big, big_report = reading(out, 'huge')
    for report in (page_report, big_report):
        assert report['scale']['source'] == 'grid' and 'scale_warning' not in report
        assert (report['scale']['gain_mm_mv'], report['scale']['paper_speed_mm_s']) == (10, 25)
        assert not (report['scale']['gain_assumed'] or report['scale']['speed_assumed'])
    ratio = big_report['scale']['px_per_mm_y'] / page_report['scale']['px_per_mm_y']
    assert ratio == pytest.approx(8000 / 2200, rel=0.02)
    assert pearson(big, page) > 0.9


def test_one_bad_file_cannot_empty_the_validation_split(sim_data, tmp_path):
    """Three records, one held out for validation: the split is drawn after the bad file is dropped, so the
    record the old split held out being unreadable leaves one of the other two to validate on."""
    root = tmp_path / 'data'
    root.mkdir()
    ids = sorted(p.name for p in sim_data.iterdir() if p.is_dir())[:3]
    for record in ids:
        shutil.copytree(sim_data / record, root / record)
    train_csv = pd.read_csv(sim_data / 'train.csv', dtype={'id': str})
    train_csv[train_csv['id'].isin(ids)].to_csv(root / 'train.csv', index=False)
    refs, _ = pdx.find_samples(root, root)
    _, held_out = pdx.split_by_record(refs, 0.3, 42)       # what the split drew before the data check
    bad = held_out[0].png
    bad.write_bytes(bad.read_bytes()[:2000])
    result = run_cli('production_trainer.py', '--sim_root', root, '--csv_root', root, *TINY, '--debug',
                     '--val_fraction', '0.3', '--seed', '42', '--output_dir', tmp_path / 'runs')
    assert 'data: 1 train / 1 val images (3 records), 1 skipped as bad' in result.stdout + result.stderr
    assert bad.name in result.stdout + result.stderr
    checked = pdx.check_samples(refs)
    first, second = checked.split(0.3, 42), checked.split(0.3, 42)
    assert [r.png for r in first[1].refs] == [r.png for r in second[1].refs]   # deterministic for a seed
