"""speed.py and the speed flags: the --amp choice per machine (CPU capability mocked), --threads, the
trainer's log of both, the batched rotation search against the per-image one, the fast CSV writer,
folded batch norms. The speed benchmarks' own tests are in test_speed_benchmarks.py."""
import json

import pytest
import torch

import ecg_decode
import ecg_model as em
import page_reader
import production_dataset as pdx
import speed
from conftest import ROOT, run_cli

CPU, CUDA, MPS = torch.device('cpu'), torch.device('cuda'), torch.device('mps')


@pytest.fixture
def machine(monkeypatch):
    """Set the mocked capabilities: machine(amx=..., cuda_bf16=...)."""
    def set_machine(amx=False, cuda_bf16=False):
        monkeypatch.setattr(speed, 'cpu_has_amx', lambda: amx)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: cuda_bf16)
    return set_machine


def test_auto_on_a_cpu_with_amx_is_bf16(machine):
    machine(amx=True)
    enabled, dtype, scaler, reason = speed.amp_choice(CPU, 'auto')
    assert (enabled, dtype, scaler) == (True, torch.bfloat16, False)
    assert 'AMX' in reason and 'bf16' in reason


def test_auto_on_a_cpu_without_amx_is_fp32(machine):
    machine(amx=False)
    enabled, dtype, scaler, reason = speed.amp_choice(CPU, 'auto')
    assert (enabled, dtype, scaler) == (False, torch.float32, False)
    assert 'without AMX' in reason


def test_cuda_bf16_where_supported_else_fp16_with_scaler(machine):
    machine(cuda_bf16=True)
    assert speed.amp_choice(CUDA, 'auto')[:3] == (True, torch.bfloat16, False)
    machine(cuda_bf16=False)
    enabled, dtype, scaler, reason = speed.amp_choice(CUDA, 'auto')
    assert (enabled, dtype, scaler) == (True, torch.float16, True) and 'GradScaler' in reason
    assert speed.amp_choice(CUDA, 'on', 'bf16')[:3] == (True, torch.bfloat16, False)   # asked for


@pytest.mark.parametrize('amp', ['auto', 'on', 'off'])
def test_mps_never_autocasts(machine, amp):
    machine(amx=True, cuda_bf16=True)
    assert speed.amp_choice(MPS, amp)[:3] == (False, torch.float32, False)


BF16, FP32 = (True, torch.bfloat16, False), (False, torch.float32, False)


@pytest.mark.parametrize('amp, expected', [('on', BF16), (True, BF16), ('off', FP32), (False, FP32), (None, FP32)])
def test_forced_choices_on_a_cpu_without_amx(machine, amp, expected):
    machine(amx=False)
    assert speed.amp_choice(CPU, amp)[:3] == expected
    machine(cuda_bf16=True)
    assert speed.amp_choice(CUDA, 'off')[:3] == (False, torch.float32, False)


@pytest.mark.parametrize('flags, has', [('fpu avx512_bf16 amx_bf16 amx_tile amx_int8', True),
                                        ('fpu avx512f avx512_bf16', False)])
def test_amx_read_from_cpuinfo_flags(tmp_path, flags, has):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n')
    assert speed.cpu_has_amx(str(cpuinfo)) is has
    assert speed.cpu_has_amx(str(tmp_path / 'missing')) is False


def test_threads_auto_is_one_per_usable_core_unless_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        monkeypatch.setattr(speed, 'usable_cores', lambda: 3)
        assert speed.set_threads('auto')[0] == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv('OMP_NUM_THREADS', '1')   # as torchrun sets it
        threads, reason = speed.set_threads('auto')
        assert threads == 1 and 'OMP_NUM_THREADS' in reason
        assert speed.set_threads(2) == (2, '--threads 2') and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize('text', ['0', '-1', 'two', '1.5'])
def test_threads_flag_rejects_nonsense(text, capsys):
    import production_trainer as pt
    with pytest.raises(SystemExit) as stop:
        pt.build_parser().parse_args(['--sim_root', 'x', '--csv_root', 'y', '--threads', text])
    assert stop.value.code == 2 and 'give auto or a positive number of threads' in capsys.readouterr().err


def test_trainer_logs_precision_and_threads_and_keeps_no_amp(sim_data, tmp_path):
    result = run_cli('production_trainer.py', '--sim_root', sim_data, '--csv_root', sim_data, '--image_size', '64',
                     '320', '--encoder', 'tu-regnetx_002', '--batch_size', '4', '--num_workers', '0', '--epochs', '1',
                     '--max_samples', '8', '--threads', '1', '--no-amp', '--output_dir', tmp_path)
    run_dir = next(tmp_path.glob('run_*'))
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['amp'] == 'off' and config['amp_enabled'] is False and config['amp_reason'] == '--amp off: fp32'
    assert config['threads'] == 1 and config['threads_used'] == 1
    log = (run_dir / 'logs' / 'train.log').read_text()
    assert 'precision: --amp off: fp32' in log and 'threads 1: --threads 1; OMP_WAIT_POLICY PASSIVE' in log
    assert 'epoch 1/1' in result.stdout


def test_amp_flag_forms_parse():
    import production_trainer as pt
    base = ['--sim_root', 'x', '--csv_root', 'y']
    assert pt.build_parser().parse_args(base).amp == 'auto' and pt.build_parser().parse_args(base).threads == 'auto'
    assert pt.build_parser().parse_args(base + ['--amp']).amp == 'on'
    assert pt.build_parser().parse_args(base + ['--amp', 'off']).amp == 'off'
    assert pt.build_parser().parse_args(base + ['--no-amp']).amp == 'off'
    assert pt.build_parser().parse_args(base + ['--threads', '3']).threads == 3


def rotated_lines(thetas, aspects, size_hw, noise, seed):
    """(B, 1, H, W) 0 mV line logits: 4 horizontal page lines turned by thetas, plus Gaussian noise."""
    height, width = size_hw
    page = torch.full((len(thetas), 1, height, width), -8.0)
    for row in (0.2, 0.4, 0.6, 0.8):
        page[:, :, int(row * height)] = 8.0
    image = ecg_decode.to_page_frame_batch(page, -thetas, aspects)     # the inverse turn: page -> image frame
    return image + noise * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))


def test_a_batch_turned_by_a_negligible_angle_is_not_resampled():
    """to_page_frame_batch takes a batch whose pages are all turned by less than NEGLIGIBLE_TURN_DEG as it is;
    in a batch with a turned page, every page is resampled (a turned one as on its own, 0 deg unchanged)."""
    maps = torch.randn(4, 3, 32, 96, generator=torch.Generator().manual_seed(0))
    aspects = torch.tensor([1.29, 1.29, 1.0, 1.5])
    assert ecg_decode.to_page_frame_batch(maps, torch.tensor([0.0, 0.049, -0.03, -0.049]), aspects) is maps
    thetas = torch.tensor([0.0, 2.5, -0.03, -1.0])
    upright = ecg_decode.to_page_frame_batch(maps, thetas, aspects)
    for i in (1, 3):
        alone = ecg_decode.to_page_frame_batch(maps[i:i + 1], thetas[i:i + 1], aspects[i:i + 1])
        assert torch.allclose(upright[i], alone[0], atol=1e-6)
    assert torch.allclose(upright[0], maps[0], atol=1e-4) and not torch.allclose(upright[1], maps[1], atol=1e-2)


@pytest.mark.parametrize('size_hw', [(64, 320), (128, 672)])
@pytest.mark.parametrize('noise', [0.0, 2.0])
def test_batched_rotation_search_matches_per_image_search_on_lines(size_hw, noise):
    thetas = torch.tensor([-6.3, -2.0, -0.4, 0.0, 0.13, 1.7, 4.9])
    aspects = torch.tensor([1.29, 1.29, 1.0, 1.29, 1.5, 1.29, 1.2])
    logits = rotated_lines(thetas, aspects, size_hw, noise, seed=1)
    regressed = torch.zeros(len(thetas))
    batched = ecg_decode.estimate_theta_batch(logits, regressed, aspects)
    assert (batched - ecg_decode.estimate_theta(logits, regressed, aspects)).abs().max() <= 0.02 + 1e-6
    assert (batched - thetas).abs().max() < 0.5                 # the turn is found (small ones may stay 0)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batched_rotation_search_matches_per_image_search_on_random_maps(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(6, 1, 64, 320, generator=generator)
    regressed = 4 * torch.randn(6, generator=generator)
    aspects = 1 + 0.5 * torch.rand(6, generator=generator)
    batched = ecg_decode.estimate_theta_batch(logits, regressed, aspects)
    assert (batched - ecg_decode.estimate_theta(logits, regressed, aspects)).abs().max() <= 0.02 + 1e-6
    default_aspect = ecg_decode.estimate_theta_batch(logits, regressed) - ecg_decode.estimate_theta(logits, regressed)
    assert default_aspect.abs().max() <= 0.02 + 1e-6


def test_batched_rotation_search_on_real_pages_and_in_several_passes(fixture_dirs, monkeypatch):
    images, signals = fixture_dirs
    dataset = pdx.ECGImageDataset.from_folders(images, signals, target_size=(128, 672))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    logits = batch['baseline'].unsqueeze(1) * 20 - 10
    regressed = torch.zeros(len(logits))
    reference = ecg_decode.estimate_theta(logits, regressed, batch['page_aspect'])
    assert (ecg_decode.estimate_theta_batch(logits, regressed, batch['page_aspect']) - reference).abs().max() <= 0.02 + 1e-6
    monkeypatch.setattr(ecg_decode, 'SEARCH_ELEMENTS', 1)               # one image per pass: the same answer
    assert (ecg_decode.estimate_theta_batch(logits, regressed, batch['page_aspect']) - reference).abs().max() <= 0.02 + 1e-6


def test_csv_text_is_what_pandas_writes(tmp_path):
    import numpy as np
    import pandas as pd
    import inference
    rng = np.random.default_rng(0)
    signal = page_reader.shown_signal((rng.normal(size=(12, 5000)) * 3).astype(np.float32))
    signal[3, :4] = [-0.0004, 0.0005, 1e6, -np.inf]
    path = tmp_path / 'pandas.csv'
    pd.DataFrame(signal.T, columns=pdx.LEADS).to_csv(path, index=False, float_format='%.3f')
    assert inference.csv_text(signal) == path.read_text()


def test_folded_batch_norms_give_the_same_maps():
    import copy
    torch.manual_seed(0)
    model = em.build_model('tu-regnetx_002')
    for module in model.modules():   # batch norms with statistics of their own, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()
    folded = speed.fold_batch_norm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    image = torch.randn(2, 3, 64, 320)
    with torch.inference_mode():
        maps, theta = model.unet(em.with_coordinates(image))
        maps_folded, theta_folded = folded.unet(em.with_coordinates(image))
    assert (maps - maps_folded).abs().max() < 1e-3 * maps.abs().max()
    assert (theta - theta_folded).abs().max() < 1e-3 * theta.abs().max().clamp(min=1)


def test_inference_and_evaluate_take_threads():
    import evaluate
    import inference
    assert inference.parse_args(['--image', 'a.png', '--checkpoint', 'b.pth', '--output', 'c.csv']).threads == 'auto'
    assert inference.parse_args(['--image', 'a', '--onnx', 'm.onnx', '--output', 'c', '--threads', '2']).threads == 2
    assert evaluate.parse_args(['--checkpoint', 'b.pth', '--threads', '1']).threads == 1


@pytest.mark.skipif(__import__('platform').libc_ver()[0] != 'glibc', reason='mallopt is glibc')
def test_freed_memory_is_kept_for_the_next_page():
    """inference.py has glibc keep freed memory (mallopt took both settings) instead of returning it."""
    assert speed.keep_freed_memory() is True
