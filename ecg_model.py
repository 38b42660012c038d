"""Multi-head U-Net for ECG image digitization: the network and its forward.

One segmentation-models-pytorch U-Net (encoder selectable, default resnet34) whose last layer gives every head's
per-pixel maps at the input size (H, W), plus smp's pooled auxiliary head for the values per image. The heads, their
channels, targets and losses are the entries of ecg_heads.HEADS; today's forward gives:

    seg       (B, 13, H, W)  lead label logits (0 background, 1..12 leads; a rhythm strip = its lead)
    grid      (B, 1, H, W)   major grid-line logits
    baseline  (B, 1, H, W)   0 mV line logits
    theta     (B,)           page rotation in degrees (positive = clockwise on screen), pooled
    trace     (B, 45, H, W)  signal head maps: 15 trace channels (12 leads + up to 3 rhythm strips),
                             their 15 zero-mV-line channels and 15 presence channels
    signal    (B, 12, 5000)  mV at 500 Hz, decoded from `trace` (ecg_decode.decode_outputs)

Also here: loading ImageNet encoder weights (the hub, or a local file) into the 5-channel input.
"""
import os
import socket
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import segmentation_models_pytorch as smp

import ecg_decode
from ecg_heads import HEAD_CHANNELS, POOLED_CHANNELS
from ecg_page import N_LEADS, N_TRACES, RHYTHM

HUB_HOST = ('huggingface.co', 443)  # where smp keeps its ImageNet encoder weights
DECODER_CHANNELS = (128, 64, 32, 32, 16)   # half smp's default width: 2x faster on CPU, traces are simple shapes
COORD_CHANNELS = 2   # x and y of each pixel beside RGB: which lead a trace is follows from where it is


class NCHWHead(nn.Conv2d):
    """The 1x1 head conv, computed in NCHW whatever layout the decoder runs in: its 60 maps come out NCHW, where
    the column soft-argmax and the de-rotation read them faster, and their gradient is not turned back to
    channels_last (the trainer's CPU layout) at 64 MB a step. With one split of the de-rotated maps
    (ecg_decode.decode_signal) a training step went from 6.6 to 7.5 img/s (tu-regnetx_002, 128 x 672, batch 4, 2 cores,
    both models stepped in turn in one run)."""

    def forward(self, features):
        return F.conv2d(features.contiguous(), self.weight.clone(memory_format=torch.contiguous_format), self.bias)


class ECGDigitizer(nn.Module):
    """U-Net with the heads of ecg_heads.HEADS (seg / grid / baseline / theta / signal); forward returns a dict
    (shapes above)."""

    def __init__(self, encoder='resnet34', decoder_channels=DECODER_CHANNELS):
        super().__init__()
        self.encoder_name = encoder
        self.model_args = {'encoder': encoder, 'decoder_channels': list(decoder_channels)}
        self.pulse_start_weight = None   # its own decoding weight, tuned on validation (None: ecg_decode.PULSE_START_WEIGHT)
        self.unet = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3 + COORD_CHANNELS,
                             classes=sum(HEAD_CHANNELS.values()), decoder_channels=decoder_channels,
                             aux_params={'classes': sum(POOLED_CHANNELS.values()),
                                         'pooling': 'avg', 'dropout': 0.0})
        # a 1x1 head: the decoder's 3x3 convs already see the neighbourhood; smp's 3x3 head over 41
        # channels at full resolution costs as much as the whole last decoder stage
        self.unet.segmentation_head[0] = NCHWHead(decoder_channels[-1], sum(HEAD_CHANNELS.values()), 1)

    def forward(self, image, geometry=None):
        """image (B, 3, H, W) -> dict of head outputs. `geometry` (ecg_decode.Geometry: theta, trace_window,
        trace_span, px_per_mv, page_aspect, ... as the dataset gives them) fixes the decoding frame: the
        trainer passes the truth so the signal loss teaches the maps, not a geometry guess; without
        it everything is read from the image (evaluation, inference)."""
        maps, pooled = self.unet(with_coordinates(image))
        out = dict(zip(HEAD_CHANNELS, torch.split(maps, list(HEAD_CHANNELS.values()), dim=1)))
        for name, values in zip(POOLED_CHANNELS, torch.split(pooled, list(POOLED_CHANNELS.values()), dim=1)):
            out[name] = values.squeeze(1)
        return ecg_decode.decode_outputs(out, ecg_decode.with_start_weight(geometry, self.pulse_start_weight))


HEAD_KEYS = ('unet.segmentation_head.0.weight', 'unet.segmentation_head.0.bias')
# what a format-2 checkpoint (no head names) holds: the four map heads of before the head registry, with 15 trace
# channels, or (the starter of 2026-11-30) with the 13 of before three rhythm strips
FORMAT2_HEADS = {'seg': 13, 'grid': 1, 'baseline': 1, 'trace': 3 * N_TRACES}
ONE_RHYTHM_HEADS = {**FORMAT2_HEADS, 'trace': 3 * (N_LEADS + 1)}


def head_rows(heads):
    """For each channel of this model's maps (HEAD_CHANNELS), where its weights come from -> list of (own, row):
    row `row` of a checkpoint saved with `heads` ({maps: channels}), or (own) of the model's own initial state.
    A head the checkpoint lacks starts fresh; a one-rhythm trace head (ONE_RHYTHM_HEADS) has its rhythm channel's
    rows copied to the two new rhythm channels, so every page it read reads the same."""
    starts = dict(zip(heads, accumulate(heads.values(), initial=0)))   # each saved head's first row
    rows, own_start = [], 0
    for name, channels in HEAD_CHANNELS.items():
        if name not in heads:
            rows += [(True, own_start + k) for k in range(channels)]
        elif heads[name] == channels:
            rows += [(False, starts[name] + k) for k in range(channels)]
        elif name == 'trace' and heads[name] == ONE_RHYTHM_HEADS['trace']:
            rows += [(False, starts[name] + kind * (N_LEADS + 1) + min(channel, RHYTHM))
                     for kind in range(3) for channel in range(N_TRACES)]
        else:
            raise ValueError(f'head channels {heads}: its {name} head has {heads[name]} channels, '
                             f'this model {channels}')
        own_start += channels
    return rows


def has_todays_heads(heads):
    """Whether head channels {maps: channels} are this model's, in its order (the rows of the last layer follow it;
    dicts that differ only in order compare equal)."""
    return list(heads.items()) == list(HEAD_CHANNELS.items())


def fit_heads(state, heads, fresh):
    """A state dict saved with head channels `heads` (ecg_checkpoint.head_channels) made to fit this model, whose
    own initial state is `fresh` (head_rows tells where each row comes from); a state of today's heads comes back as
    it is. A head this model does not have is refused."""
    if has_todays_heads(heads):
        return state
    unknown = sorted(set(heads) - set(HEAD_CHANNELS))
    if unknown:
        raise ValueError(f'head channels {heads}: this toolkit has no {unknown} head (its heads: {HEAD_CHANNELS})')
    rows = head_rows(heads)
    fitted = dict(state)
    for key in HEAD_KEYS:
        fitted[key] = torch.stack([(fresh if own else state)[key][row] for own, row in rows]).clone()
    return fitted


def load_weights(model, state, heads):
    """Load a checkpoint's state dict, saved with head channels `heads`, into model (fit_heads)."""
    model.load_state_dict(fit_heads(state, heads, model.state_dict()))


def with_coordinates(image):
    """(B, 3, H, W) -> (B, 5, H, W): RGB plus x and y in [-1, 1] (CoordConv), so the network can tell
    the strips apart by their place on the page without learning position from context alone."""
    batch, _, height, width = image.shape
    y = torch.linspace(-1, 1, height, device=image.device, dtype=image.dtype).view(1, 1, -1, 1)
    x = torch.linspace(-1, 1, width, device=image.device, dtype=image.dtype).view(1, 1, 1, -1)
    return torch.cat([image, x.expand(batch, 1, height, width), y.expand(batch, 1, height, width)], dim=1)



# ---------------------------------------------------------------- geometry


# ---------------------------------------------------------------- building and weights

def hub_reachable(timeout=3.0):
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def load_encoder_file(model, path):
    """Load a local encoder weights file (.pth/.pt state dict, e.g. torchvision's resnet34, or
    smp-hub's .safetensors) into the encoder; fails naming the file when the keys do not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--pretrained_path {path}: file not found')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
        state = state.get('state_dict', state) if isinstance(state, dict) else state
    state = {k.removeprefix('encoder.'): v for k, v in state.items()}
    encoder = model.unet.encoder
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    usable.update({k: widen_first_conv(v, own[k]) for k, v in state.items()
                   if k in own and k not in usable and is_rgb_conv(v, own[k])})
    if len(usable) < 0.9 * len(own):
        raise ValueError(f'--pretrained_path {path}: only {len(usable)} of {len(own)} {model.encoder_name} '
                         f'encoder tensors match (is it a {model.encoder_name} state dict?)')
    encoder.load_state_dict(usable, strict=False)
    return len(usable)


def is_rgb_conv(weight, own):
    """An ImageNet first conv (out, 3, k, k) where ours takes RGB + coordinates (out, 5, k, k)."""
    return weight.dim() == 4 and own.dim() == 4 and weight.shape[1] == 3 and \
        own.shape[1] == 3 + COORD_CHANNELS and weight.shape[0] == own.shape[0] and weight.shape[2:] == own.shape[2:]


def widen_first_conv(weight, own):
    """RGB filters kept as they were, coordinate filters start at zero (the pretrained start unchanged)."""
    wide = torch.zeros_like(own)
    wide[:, :3] = weight
    return wide


def load_imagenet_encoder(model):
    """ImageNet encoder weights the way smp gets them (Hugging Face hub, or its local cache). Without
    a network it goes offline at once instead of retrying for half a minute, and says what to do."""
    if not hub_reachable():
        os.environ['HF_HUB_OFFLINE'] = '1'
        import huggingface_hub.constants as hub_constants
        hub_constants.HF_HUB_OFFLINE = True
    try:
        encoder = smp.encoders.get_encoder(model.encoder_name, in_channels=3, weights='imagenet')
    except Exception as exc:
        raise RuntimeError(
            f'--pretrained: ImageNet weights for {model.encoder_name} could not be had ({type(exc).__name__}: '
            f'the hub is not reachable and the weights are not in the local Hugging Face cache). '
            f'Run once with network access, or pass --pretrained_path FILE with a local encoder state dict '
            f'(e.g. torchvision resnet34 .pth or smp-hub model.safetensors), or train without --pretrained.'
        ) from exc
    own = model.unet.encoder.state_dict()
    model.unet.encoder.load_state_dict({k: widen_first_conv(v, own[k]) if is_rgb_conv(v, own[k]) else v
                                        for k, v in encoder.state_dict().items()})


def build_model(encoder='resnet34', pretrained=False, pretrained_path=None, decoder_channels=DECODER_CHANNELS):
    model = ECGDigitizer(encoder, decoder_channels)
    if pretrained_path:
        load_encoder_file(model, pretrained_path)
    elif pretrained:
        load_imagenet_encoder(model)
    return model



# ---------------------------------------------------------------- pictures

