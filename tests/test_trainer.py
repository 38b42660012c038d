"""production_trainer CLI on tiny simulator data: run files, TensorBoard tags, resume, torchrun, --pretrained."""
import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli, run_in_process

TINY = ['--image_size', '64', '320', '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0',
        '--log_every', '1']
TAGS = [f'{split}/{name}_loss' for split in ('Train', 'Val') for name in
        ('total', 'seg', 'grid', 'baseline', 'theta', 'signal')] + ['Val/pearson', 'Val/snr_db', 'Train/lr']


def train(sim_data, out, *extra):
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                     '--output_dir', out, *extra)
    runs = sorted(Path(out).glob('run_*'))
    return runs[-1], result


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope='module')
def debug_run(sim_data, tmp_path_factory):
    config = tmp_path_factory.mktemp('cfg') / 'config.json'
    config.write_text(json.dumps({'loss_weights': {'seg': 1.2, 'grid': 0.4, 'signal': 3.0}}))
    return train(sim_data, tmp_path_factory.mktemp('exp'), '--debug', '--save_every', '1', '--config', config,
                 '--loss_weight_grid', '0.7')


def test_debug_run_writes_every_file(debug_run):
    run_dir, result = debug_run
    names = sorted(p.name for p in (run_dir / 'checkpoints').iterdir())
    assert names == ['best.pth', 'epoch_1.pth', 'epoch_2.pth', 'epoch_3.pth', 'last.pth']
    log = (run_dir / 'logs' / 'train.log').read_text()
    assert log.count('epoch 3/3') == 1 and 'debug mode: 100 samples, 3 epochs' in log
    assert 'val loss' in log and 'img/s' in log
    checkpoint = torch.load(run_dir / 'checkpoints' / 'last.pth')
    for key in ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'global_step', 'best_metric', 'config', 'rng'):
        assert key in checkpoint, key
    assert checkpoint['epoch'] == 3 and checkpoint['global_step'] == 3 * 2   # 11 train images, batch 4, drop_last


def test_best_checkpoint_keeps_the_decoding_its_validation_pages_read_best(debug_run):
    """When training ends, best.pth's maps are decoded with every tried pulse start weight on the validation
    pages, and the default is kept unless another reads clearly better (chosen_start_weight); loading best.pth
    gives the model that weight."""
    import re
    import ecg_checkpoint
    import ecg_decode
    import production_trainer
    run_dir, _ = debug_run
    log = (run_dir / 'logs' / 'train.log').read_text()
    line = re.search(r'decoding: pulse start weight (\S+) kept in best.pth \(validation Pearson (.*)\)', log)
    assert line, log[-2000:]
    scores = {float(w): float(p) for w, p in (pair.split(': ') for pair in line.group(2).split(', '))}
    assert set(scores) == set(ecg_decode.PULSE_START_WEIGHTS_TRIED)
    kept = torch.load(run_dir / 'checkpoints' / 'best.pth')['decoding']['pulse_start_weight']
    assert kept == float(line.group(1)) == production_trainer.chosen_start_weight(scores)
    model, _ = ecg_checkpoint.load_model(run_dir / 'checkpoints' / 'best.pth')
    assert model.pulse_start_weight == kept
    assert torch.load(run_dir / 'checkpoints' / 'last.pth')['decoding'] == {}   # only best.pth is tuned


def test_a_pulse_start_weight_must_beat_the_default_clearly_to_be_kept():
    import production_trainer
    choose = production_trainer.chosen_start_weight
    assert choose({0.5: 0.9017, 2.0: 0.9047, 10.0: 0.9049, 50.0: 0.9044}) == 2.0    # 0.0002 better: noise
    assert choose({0.5: 0.70, 2.0: 0.78, 10.0: 0.90, 50.0: 0.89}) == 10.0          # 12x1 pages of a mix model
    assert choose({0.5: 0.80, 10.0: 0.81}) == 10.0                                 # no default among them


def test_resuming_a_finished_run_tunes_the_decoding_of_its_best_checkpoint(debug_run, tmp_path):
    """A run from before the tuning (best.pth without 'decoding'), resumed from its last.pth: no epoch is
    trained again, and best.pth gets its weight."""
    import shutil
    run_dir = tmp_path / debug_run[0].name
    shutil.copytree(debug_run[0], run_dir)
    best = run_dir / 'checkpoints' / 'best.pth'
    checkpoint = torch.load(best)
    del checkpoint['decoding']
    torch.save(checkpoint, best)
    run_cli('production_trainer.py', '--resume', run_dir / 'checkpoints' / 'last.pth')
    log = (run_dir / 'logs' / 'train.log').read_text()
    assert log.count('epoch 3/3') == 1 and log.count('decoding: pulse start weight') == 2
    assert torch.load(best)['decoding'] == torch.load(debug_run[0] / 'checkpoints' / 'best.pth')['decoding']


def test_config_records_resolved_settings_and_loss_weights(debug_run):
    run_dir, _ = debug_run
    config = json.loads((run_dir / 'config.json').read_text())
    # CLI beats the --config file, which beats the defaults
    assert config['loss_weights'] == {'seg': 1.2, 'grid': 0.7, 'baseline': 0.8, 'theta': 0.3, 'signal': 3.0}
    assert config['epochs'] == 3 and config['max_samples'] == 100 and config['device'] == 'cpu'
    assert config['image_size'] == [64, 320] and config['encoder'] == 'tu-regnetx_002'


def test_tensorboard_has_the_guides_tags_and_images(debug_run):
    run_dir, _ = debug_run
    events = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0}).Reload()
    tags = events.Tags()
    for tag in TAGS:
        assert tag in tags['scalars'], tag
    assert any(t.startswith('Val/prediction') for t in tags['images'])
    steps = [s for s, _ in scalars(run_dir, 'Train/total_loss')]
    assert steps == list(range(1, 7))
    assert all(0 < v < 100 for _, v in scalars(run_dir, 'Train/total_loss'))
    assert len(scalars(run_dir, 'Val/snr_db')) == 3


def test_interrupted_and_resumed_run_reproduces_uninterrupted(sim_data, tmp_path):
    # with a moving average of the weights, whose state must survive the stop as well, and photo-like images,
    # drawn the same after the stop
    common = ['--epochs', '2', '--seed', '3', '--max_samples', '8', '--ema_decay', '0.5', '--photo_aug', '0.5']
    whole, _ = train(sim_data, tmp_path / 'whole', *common)
    part, _ = train(sim_data, tmp_path / 'part', *common, '--time_budget_min', '0')   # stops after epoch 1
    first = torch.load(part / 'checkpoints' / 'last.pth')
    assert first['epoch'] == 1
    assert first['scheduler']['lr_lambdas'][0]['epochs'] == 1   # the budget had room for no more
    assert 'schedule laid over 1 epochs' in (part / 'logs' / 'train.log').read_text()
    # --epochs on the resume command lays the schedule over 2 epochs again
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY, *common,
                     '--output_dir', tmp_path / 'elsewhere', '--resume', part / 'checkpoints' / 'last.pth')
    assert 'resumed from' in result.stdout and not (tmp_path / 'elsewhere').exists()   # same run folder
    assert torch.load(part / 'checkpoints' / 'last.pth')['epoch'] == 2
    a = scalars(whole, 'Train/total_loss')
    b = scalars(part, 'Train/total_loss')
    assert [s for s, _ in b] == [s for s, _ in a]            # no duplicated or missing steps
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5)
    last_a = torch.load(whole / 'checkpoints' / 'last.pth')
    last_b = torch.load(part / 'checkpoints' / 'last.pth')
    assert last_a['ema_steps'] == last_b['ema_steps'] == last_a['global_step'] > 0   # one update a step
    for weights in ('model', 'train_model'):   # the average, and the weights the optimizer steps
        for key in last_a[weights]:
            assert torch.allclose(last_a[weights][key].float(), last_b[weights][key].float(), atol=1e-6), key
    conv = 'unet.segmentation_head.0.weight'
    assert not torch.allclose(last_a['model'][conv], last_a['train_model'][conv])


def test_moving_average_follows_each_update_at_its_decay():
    import production_trainer
    model = torch.nn.Linear(2, 1)
    ema = production_trainer.build_ema(model, 0.75)
    before = model.weight.detach().clone()
    ema.update_parameters(model)                      # the first update copies
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update_parameters(model)
    assert torch.allclose(production_trainer.weights_to_use(model, ema).weight, before + 0.25 * 4.0)
    assert production_trainer.build_ema(model, 0) is None and production_trainer.weights_to_use(model, None) is model
    with pytest.raises(production_trainer.ecg_cli.InputError, match='--ema_decay 1'):
        production_trainer.check_ema_decay(1)


@pytest.mark.parametrize('minutes, done, here, seconds, expected', [
    (10, 2, 2, 120, 10),    # 60 s an epoch, 8 min left: 8 more
    (100, 2, 2, 120, 20),   # room for 98 more, but --epochs is 20
    (10, 5, 1, 700, 5),     # past the budget: the epochs done
    (10, 7, 2, 120, 15),    # a resumed run: its own 2 epochs time it, 8 more after the 7 done
])
def test_time_budget_fits_the_epochs_it_has_room_for(minutes, done, here, seconds, expected):
    from production_trainer import epochs_in_budget
    assert epochs_in_budget({'time_budget_min': minutes, 'epochs': 20}, done, here, seconds) == expected


def test_warmup_cosine_ends_annealed_wherever_the_budget_lays_it():
    from production_trainer import WarmupCosine
    schedule = WarmupCosine(epochs=20, steps_per_epoch=10)
    assert schedule(0) == pytest.approx(1 / 10) and schedule(10) == pytest.approx(1.0, abs=0.01)
    assert schedule(199) == pytest.approx(0.01, abs=1e-3)
    schedule.epochs = 8
    assert schedule(79) == pytest.approx(0.01, abs=1e-3) and schedule(40) < 0.6
    held = WarmupCosine(epochs=20, steps_per_epoch=10, decay_fraction=0.2)   # the peak until the last 40 steps
    assert [held(step) for step in (10, 100, 160)] == [1.0, 1.0, 1.0]
    assert held(180) == pytest.approx(0.505, abs=0.01) and held(199) == pytest.approx(0.01, abs=0.005)


def test_torchrun_two_cpu_processes(sim_data, tmp_path):
    run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                     'production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                     '--force_cpu', '--epochs', '2', '--max_samples', '12', '--output_dir', tmp_path)
    runs = list(tmp_path.glob('run_*'))
    assert len(runs) == 1, 'rank 0 alone makes the run folder'
    log = (runs[0] / 'logs' / 'train.log').read_text()
    assert 'world size 2' in log and log.count('epoch 2/2') == 1
    checkpoint = torch.load(runs[0] / 'checkpoints' / 'last.pth')
    # 11 train images, 2 ranks x batch 4, drop_last: one step per epoch
    assert checkpoint['epoch'] == 2 and checkpoint['global_step'] == 2


def test_pretrained_offline_fails_fast_on_the_cli(sim_data, tmp_path):
    import ecg_model
    if ecg_model.hub_reachable():
        pytest.skip('the weights hub is reachable here')
    start = time.perf_counter()
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                     '--encoder', 'resnet18', '--pretrained', '--output_dir', tmp_path, check=False)
    assert result.returncode != 0 and time.perf_counter() - start < 60
    assert 'could not be had' in result.stderr and '--pretrained_path' in result.stderr
    assert 'Retrying' not in result.stderr


def test_photo_aug_outside_0_to_1_fails_clearly(sim_data, tmp_path):
    result = run_in_process('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, *TINY,
                            '--output_dir', tmp_path, '--photo_aug', '1.5')
    assert result.returncode != 0 and '--photo_aug 1.5: give a share in [0, 1]' in result.stderr


def test_bad_data_path_fails_clearly(tmp_path):
    result = run_in_process('production_trainer.py', '--sim_root', tmp_path / 'nope', '--csv_root', tmp_path, *TINY,
                            '--output_dir', tmp_path)
    assert result.returncode != 0 and 'nope: --sim_root is not a folder' in result.stderr


def test_resuming_a_run_of_one_rhythm_channel_stops_with_advice_to_init_from(one_rhythm_checkpoint):
    """A checkpoint made before the three rhythm strips (a 54-channel head, as the starter of 2026-11-30): its
    optimizer state cannot fit today's head, so resuming stops with a clear error that names --init_from, before
    any state is touched; --init_from itself loads it (its rhythm channel widened)."""
    import ecg_checkpoint
    import ecg_model
    import ecg_cli
    import production_trainer
    model = ecg_model.ECGDigitizer(**ecg_checkpoint.load(one_rhythm_checkpoint)['model_args'])
    with pytest.raises(ecg_cli.InputError, match='--init_from'):
        production_trainer.resume_from(one_rhythm_checkpoint,
                                       production_trainer.Training(model, None, None, None, device='cpu'), {})
    production_trainer.init_weights(model, one_rhythm_checkpoint)
    head = model.unet.segmentation_head[0].weight
    assert torch.equal(head[15 + 12], head[15 + 13]) and torch.equal(head[15 + 12], head[15 + 14])
