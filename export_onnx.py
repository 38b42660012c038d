"""Export a checkpoint's network to ONNX, and run it with onnxruntime in place of torch.

    python export_onnx.py --checkpoint best.pth --output model.onnx
    python inference.py --image scans/ --onnx model.onnx --output signals/

What is exported: the U-Net with its CoordConv coordinate channels, image (B, 3, H, W) -> the raw maps
`maps` (B, 60, H, W: seg 13, grid 1, baseline 1, trace 45, in that order) and `theta` (B,) in degrees,
with a dynamic batch and the checkpoint's fixed H x W (written into the file's metadata). The decoding
(ecg_decode.decode_outputs: rotation search, de-rotation, soft-argmax, resampling to 500 Hz) stays a
torch step after it: its data-dependent search and scatter-adds are not worth a second implementation.
Batch norms are folded into the convolutions before export (onnxruntime would fold them anyway).

onnx and onnxruntime are optional: `pip install -r requirements-export.txt` (or `./setup.sh --export`).
The export uses torch's TorchScript exporter (dynamo=False): it needs only the onnx package, where the
newer dynamo exporter also needs onnxscript.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import ecg_checkpoint
import ecg_decode
import ecg_heads
import ecg_model
import speed

OPSET = 17
INPUT, OUTPUTS = 'image', ('maps', 'theta')
EXTRAS = 'pip install -r requirements-export.txt (or ./setup.sh --export)'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Export a checkpoint\'s network (U-Net + CoordConv) to ONNX.')
    p.add_argument('--checkpoint', required=True, type=Path, help='a trained .pth (e.g. checkpoints/best.pth)')
    p.add_argument('--output', required=True, type=Path, help='the .onnx file to write')
    p.add_argument('--opset', type=int, default=OPSET, help='ONNX opset version')
    return p.parse_args(argv)


class Network(torch.nn.Module):
    """ECGDigitizer without its decoding: image (B, 3, H, W) -> maps (B, 60, H, W), theta (B,)."""

    def __init__(self, model):
        super().__init__()
        self.unet = model.unet

    def forward(self, image):
        maps, theta = self.unet(ecg_model.with_coordinates(image))
        return maps, theta.squeeze(1)


def require(module):
    """import onnx / onnxruntime, or stop with how to install them."""
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f'error: {module} is not installed; it is an optional extra: {EXTRAS}')


def export(checkpoint, output, opset=OPSET):
    """checkpoint .pth -> .onnx (dynamic batch, the checkpoint's H x W); returns (H, W)."""
    onnx = require('onnx')
    model, state = ecg_checkpoint.load_model(checkpoint, 'cpu')
    size_hw = ecg_checkpoint.input_size(state)
    network = Network(speed.fold_batch_norm(model)).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: 'batch'} for name in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings():   # the TorchScript exporter is deprecated, and works
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.onnx.export(network, (torch.zeros(1, 3, *size_hw),), str(output), input_names=[INPUT],
                          output_names=list(OUTPUTS), dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    graph = onnx.load(str(output))
    onnx.checker.check_model(graph)
    meta = {'image_size': list(size_hw), 'head_channels': ecg_heads.HEAD_CHANNELS, 'checkpoint': str(checkpoint),
            'pulse_start_weight': model.pulse_start_weight, 'layouts': ecg_checkpoint.trained_layouts(state)}
    graph.metadata_props.add(key='ecg_digitizer', value=json.dumps(meta))
    onnx.save(graph, str(output))
    return size_hw


class OnnxDigitizer:
    """An exported network in onnxruntime (CPU provider), called like ECGDigitizer: (images (B, 3, H, W),
    geometry) -> the same output dict, decoded by ecg_decode.decode_outputs in torch."""

    def __init__(self, path, threads=None):
        ort = require('onnxruntime')
        options = ort.SessionOptions()
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')   # OMP_WAIT_POLICY=PASSIVE's twin
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map['ecg_digitizer'])
        self.image_size = tuple(meta['image_size'])
        self.head_channels = meta['head_channels']
        self.pulse_start_weight = meta.get('pulse_start_weight')   # the checkpoint's decoding, as ECGDigitizer's
        self.trained_layouts = meta.get('layouts') or list(ecg_checkpoint.TRAINED_LAYOUTS)   # as load_checkpoint sets

    def __call__(self, images, geometry=None):
        image = np.ascontiguousarray(images.detach().float().cpu().numpy())
        maps, theta = (torch.from_numpy(v) for v in self.session.run(list(OUTPUTS), {INPUT: image}))
        out = dict(zip(self.head_channels, torch.split(maps, list(self.head_channels.values()), dim=1)))
        out['theta'] = theta
        return ecg_decode.decode_outputs(out, ecg_decode.with_start_weight(geometry, self.pulse_start_weight))


def main(argv=None):
    args = parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f'error: {args.checkpoint}: checkpoint not found')
    size_hw = export(args.checkpoint, args.output, args.opset)
    print(f'wrote {args.output} (input (batch, 3, {size_hw[0]}, {size_hw[1]}), outputs maps and theta; '
          f'decode with ecg_decode.decode_outputs, as inference.py --onnx does)')


if __name__ == '__main__':
    main()
