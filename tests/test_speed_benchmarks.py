"""bench_threads.py and bench_inference.py run and report what they promise (values, not timings)."""
import json

import pytest

from conftest import run_cli


def test_bench_threads_reports_alone_and_beside_a_competitor(tmp_path):
    # one setting keeps it short; each measurement is a run of its own
    result = run_cli('bench_threads.py', '--settings', 'auto', '--seconds', '1', '--images', '4', '--batch_size', '2',
                     '--num_workers', '0', '--image_size', '64', '320', '--competitor', 'spin',
                     '--data', tmp_path / 'data', '--report', tmp_path / 'report.json')
    report = json.loads((tmp_path / 'report.json').read_text())
    rows = {(r['setting'], r['condition']): r for r in report['results']}
    assert set(rows) == {('auto', 'alone'), ('auto', 'beside spin')}
    assert all(r['images_per_s'] > 0 and r['steps'] >= 1 for r in rows.values())
    assert rows['auto', 'alone']['threads'] == report['cores']
    ratio = rows['auto', 'beside spin']['images_per_s'] / rows['auto', 'alone']['images_per_s']
    assert report['busy_over_alone']['auto'] == pytest.approx(ratio) and '% of its speed alone' in result.stdout


def test_bench_inference_reports_old_and_new_paths_with_the_same_signals(tmp_path):
    # --against HEAD: the whole command of a commit's own files (git archive) beside today's
    result = run_cli('bench_inference.py', '--n', '3', '--image_size', '64', '320', '--settings', 'old', 'new',
                     '--data', tmp_path / 'pages', '--out', tmp_path / 'out', '--report', tmp_path / 'report.json',
                     '--against', 'HEAD')
    report = json.loads((tmp_path / 'report.json').read_text())
    old, new = report['results']['old'], report['results']['new']
    assert old['images'] == new['images'] == 3 and old['batch_size'] == 1 and new['batch_size'] == 4
    assert all(r['images_per_s'] > 0 and r['cpu_s_per_image'] > 0 and r['peak_rss_mib'] > 100 for r in (old, new))
    assert new['max_diff_vs_old_mv'] < 0.01                      # same model: float rounding only
    assert new['speedup_vs_old'] == pytest.approx(new['images_per_s'] / old['images_per_s'])
    assert len(list((tmp_path / 'out' / 'new').glob('*.csv'))) == 3 and 'new / old:' in result.stdout
    commands = report['whole_command']
    assert (tmp_path / 'out' / 'src_HEAD' / 'inference.py').is_file()
    for name in ('HEAD', 'today'):
        assert commands[name]['seconds_n'] > 0 and commands[name]['seconds_1'] > 0
        assert len(list((tmp_path / 'out' / f'csv_{name}_3').glob('*.csv'))) == 3
    assert commands['speedup'] == pytest.approx(commands['today']['images_per_s'] / commands['HEAD']['images_per_s'])
    assert 'today / HEAD:' in result.stdout


def test_bench_inference_against_an_unknown_commit_ends_in_one_line(tmp_path):
    import bench_inference
    with pytest.raises(SystemExit, match='--against nosuchcommit: git archive could not read it'):
        bench_inference.commit_tree('nosuchcommit', tmp_path)
    assert not (tmp_path / 'src_nosuchcommit').exists()


def test_bench_inference_times_every_kind_of_page_inference_reads(tmp_path):
    """--pages takes photos, scans and PDFs as inference.py does (the 12 MP photo cost check), not PNGs alone."""
    import argparse

    import bench_inference
    for name in ('b.png', 'a.JPG', 'sub/c.tiff', 'd.pdf', 'notes.txt', 'e.json'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    pages = bench_inference.bench_images(argparse.Namespace(pages=tmp_path, n=3))
    assert [path.relative_to(tmp_path).as_posix() for path in pages] == ['a.JPG', 'b.png', 'd.pdf']
