"""Training-step throughput, measured side by side in one run: fp32 vs bf16 autocast, per encoder.

    python bench_train_step.py                                   # CPU: the default CPU and GPU encoders
    python bench_train_step.py --device cuda --batch_size 16     # a GPU: fp32, bf16, fp16 + GradScaler

Each configuration runs the real forward (all heads and the signal decoding), the composite loss,
backward and an AdamW step on one batch of simulator images, repeated; reports images per second,
the bf16 / fp32 ratio per encoder, and what the trainer's `--amp auto` picks on this machine and why
(speed.amp_choice). Writes bench_out/bench_train_step.json (--report).
"""
import argparse
import json
import time
from pathlib import Path

import torch

import ecg_decode
import ecg_model
import ecg_simulator
import ecg_trainer
import production_dataset as pdx
import speed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--encoders', nargs='+', default=['tu-regnetx_002', 'resnet34'])
    p.add_argument('--image_size', type=int, nargs=2, default=list(pdx.DEFAULT_IMAGE_SIZE), metavar=('H', 'W'))
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--steps', type=int, default=3, help='timed steps per configuration (after one warm-up)')
    p.add_argument('--data', default='bench_out/train_step_data')
    p.add_argument('--report', type=Path, default=Path('bench_out/bench_train_step.json'), help='the JSON report')
    return p.parse_args(argv)


def make_batch(folder, size, batch_size, device):
    if not (Path(folder) / 'train.csv').is_file():
        ecg_simulator.generate(folder, batch_size, seed=5, dpi_choices=(200,))
    dataset = pdx.ECGImageDataset.from_folders(folder, folder, target_size=size, max_samples=batch_size)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def precisions(device):
    """(name, autocast dtype or None, use GradScaler) to compare on this device."""
    if device.type == 'cuda':
        return [('fp32', None, False), ('bf16', torch.bfloat16, False), ('fp16+scaler', torch.float16, True)]
    return [('fp32', None, False), ('bf16', torch.bfloat16, False)]


def time_steps(encoder, batch, device, dtype, use_scaler, steps):
    torch.manual_seed(0)
    model = ecg_model.build_model(encoder).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = ecg_trainer.CompositeLoss()
    image = batch['image'].contiguous(memory_format=torch.channels_last)
    times, losses = [], []
    for step in range(steps + 1):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model(image, ecg_decode.true_geometry(batch)), batch)['total']
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if step:   # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return len(image) * len(times) / sum(times), losses


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    batch = make_batch(args.data, tuple(args.image_size), args.batch_size, device)
    results = []
    for encoder in args.encoders:
        for name, dtype, use_scaler in precisions(device):
            images_per_s, losses = time_steps(encoder, batch, device, dtype, use_scaler, args.steps)
            results.append({'encoder': encoder, 'precision': name, 'images_per_s': images_per_s,
                            'first_loss': losses[0], 'last_loss': losses[-1]})
            print(f'{encoder:16s} {name:12s} {images_per_s:7.2f} img/s   loss {losses[0]:.3f} -> {losses[-1]:.3f}',
                  flush=True)
    ratios = bf16_over_fp32(results)
    enabled, dtype, _, reason = speed.amp_choice(device, 'auto')
    for encoder, ratio in ratios.items():
        print(f'{encoder:16s} bf16 / fp32 {ratio:.2f}x')
    print(f'--amp auto here: {reason}')
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with open(args.report, 'w') as handle:
        json.dump({'device': str(device), 'image_size': args.image_size, 'batch_size': args.batch_size,
                   'results': results, 'bf16_over_fp32': ratios,
                   'amp_auto': {'enabled': enabled, 'dtype': str(dtype).replace('torch.', ''), 'reason': reason}},
                  handle, indent=2)


def bf16_over_fp32(results):
    """{encoder: bf16 img/s / fp32 img/s}, measured side by side in this run."""
    speeds = {(r['encoder'], r['precision']): r['images_per_s'] for r in results}
    return {encoder: speeds[encoder, 'bf16'] / speeds[encoder, 'fp32']
            for encoder, precision in speeds if precision == 'fp32' and (encoder, 'bf16') in speeds}


if __name__ == '__main__':
    main()
