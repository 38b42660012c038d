"""A head is one entry of ecg_heads.HEADS: a head added there, and nowhere else, is built by the model, drawn, cached
and moved by the dataset, weighed by the loss, logged, saved and read back by the scripts; checkpoints without it
load with it fresh."""
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ecg_checkpoint
import ecg_heads
import ecg_model
import production_trainer
from conftest import ROOT, run_cli

TINY = ['--image_size', '64', '320', '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0']
REGISTRY = '# ---------------------------------------------------------------- the registry'
# a head a contributor might add: every pixel some trace covers, whatever its lead
INK_HEAD = '''
def ink_targets(drawn):
    return {'ink': (seg_targets(drawn)['seg'] > 0).astype(np.uint8)}


def ink_loss(outputs, batch):
    bce = map_bce(outputs['ink'], batch['ink'], torch.ones_like(batch['theta']), 2.0)
    return bce, {'ink_bce': bce}


'''
INK_ENTRY = ("    Head('ink', 0.25, {'ink': pixel_map(torch.float32)}, ink_targets, ink_loss, maps='ink', channels=1,\n"
             "         parts=('ink_bce',)),\n")


@pytest.fixture(scope='module')
def ink_tree(tmp_path_factory):
    """A copy of the project whose ecg_heads.py, and only it, has one head more."""
    tree = tmp_path_factory.mktemp('ink_tree')
    for path in ROOT.glob('*.py'):
        shutil.copy(path, tree)
    heads = (tree / 'ecg_heads.py').read_text()
    assert heads.count(REGISTRY) == 1 and heads.count('\n)\nHEAD_CHANNELS') == 1
    heads = heads.replace(REGISTRY, INK_HEAD + REGISTRY)
    heads = heads.replace('\n)\nHEAD_CHANNELS', '\n' + INK_ENTRY + ')\nHEAD_CHANNELS')
    (tree / 'ecg_heads.py').write_text(heads)
    return tree


@pytest.fixture(scope='module')
def ink_run(ink_tree, sim_data, tmp_path_factory):
    """One cached epoch of the copy's trainer, its heads but the new one started from the shipped starter."""
    out = tmp_path_factory.mktemp('ink_run')
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY, '--epochs', '1',
                     '--max_samples', '8', '--cache', '--log_every', '1', '--loss_weight_ink', '0.5', '--init_from',
                     ROOT / ecg_checkpoint.STARTER, '--output_dir', out, cwd=ink_tree)
    return next(out.glob('run_*')), result


def test_a_head_added_to_the_registry_alone_is_trained_logged_and_saved(ink_run):
    run_dir, result = ink_run
    best = torch.load(run_dir / 'checkpoints' / 'best.pth')
    assert best['head_channels'] == {**ecg_heads.HEAD_CHANNELS, 'ink': 1}
    assert best['model'][ecg_model.HEAD_KEYS[0]].shape[0] == sum(ecg_heads.HEAD_CHANNELS.values()) + 1
    assert best['config']['loss_weights']['ink'] == 0.5
    epoch = production_trainer.read_metrics(run_dir)[0]
    assert 0 < epoch['train']['ink'] < 10 and epoch['train']['ink_bce'] == pytest.approx(epoch['train']['ink'])
    expected = sum(best['config']['loss_weights'][name] * epoch['val'][name] for name in best['config']['loss_weights'])
    assert epoch['val']['total'] == pytest.approx(expected, rel=1e-4)
    events = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0}).Reload()
    assert {'Train/ink_loss', 'Val/ink_loss', 'Train/ink_parts/ink_bce', 'Train/signal_parts/signal_l1'} <= set(
        events.Tags()['scalars'])
    assert 'weights from' in result.stdout + result.stderr


def test_scripts_of_the_grown_tree_read_with_the_new_head_and_todays_refuse_it(ink_run, ink_tree, sim_data, tmp_path):
    run_dir, _ = ink_run
    best = run_dir / 'checkpoints' / 'best.pth'
    page = sorted(sim_data.glob('*/*.png'))[0]
    run_cli('inference.py', '--checkpoint', best, '--image', page, '--output', tmp_path / 'read.csv', cwd=ink_tree)
    assert len((tmp_path / 'read.csv').read_text().splitlines()) == 5001       # the header and 10 s at 500 Hz
    refused = run_cli('inference.py', '--checkpoint', best, '--image', page, '--output', tmp_path / 'no.csv',
                      check=False)
    assert refused.returncode != 0 and "no ['ink'] head" in refused.stderr and str(best) in refused.stderr
    resumed = run_cli('production_trainer.py', '--resume', best, check=False)
    assert resumed.returncode != 0 and '--init_from' in resumed.stderr and "'ink': 1" in resumed.stderr


def test_a_checkpoint_without_a_head_loads_with_that_head_fresh(monkeypatch):
    """The starter's heads (one rhythm channel, no ink) into a model with an ink head: seg, grid and baseline rows
    as saved, the trace rows widened, the ink row the model's own."""
    grown = {**ecg_heads.HEAD_CHANNELS, 'ink': 1}
    monkeypatch.setattr(ecg_model, 'HEAD_CHANNELS', grown)
    saved_rows, own_rows = sum(ecg_model.ONE_RHYTHM_HEADS.values()), sum(grown.values())
    shape = {key: [16, 1, 1] if key.endswith('weight') else [] for key in ecg_model.HEAD_KEYS}
    saved = {key: torch.randn(saved_rows, *shape[key]) for key in ecg_model.HEAD_KEYS}
    fresh = {key: torch.randn(own_rows, *shape[key]) for key in ecg_model.HEAD_KEYS}
    fitted = ecg_model.fit_heads(saved, ecg_model.ONE_RHYTHM_HEADS, fresh)
    for key in ecg_model.HEAD_KEYS:
        assert torch.equal(fitted[key][:15], saved[key][:15])
        assert torch.equal(fitted[key][15 + 14], saved[key][15 + 12])        # the third rhythm strip's trace row
        assert torch.equal(fitted[key][-1], fresh[key][-1])
    with pytest.raises(ValueError, match=r"no \['pulse'\] head"):
        ecg_model.fit_heads(saved, {**ecg_model.ONE_RHYTHM_HEADS, 'pulse': 2}, fresh)


def test_heads_saved_in_another_order_load_by_name():
    """Today's heads in another order are not today's (dicts that differ in order compare equal): each head's rows
    are taken from where that checkpoint put them."""
    heads = ecg_heads.HEAD_CHANNELS
    reordered = dict(reversed(heads.items()))
    assert reordered == heads and not ecg_model.has_todays_heads(reordered) and ecg_model.has_todays_heads(dict(heads))
    rows = sum(heads.values())
    saved = {key: torch.arange(rows, dtype=torch.float32) for key in ecg_model.HEAD_KEYS}
    fitted = ecg_model.fit_heads(saved, reordered, saved)
    seg_rows = fitted[ecg_model.HEAD_KEYS[1]][:heads['seg']]
    assert seg_rows.tolist() == list(range(rows - heads['seg'], rows))     # seg was saved last
