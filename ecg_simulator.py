#!/usr/bin/env python3
"""Built-in ECG simulator: synthetic 12-lead signals and paper-ECG images in ecg-image-kit's format.

For people who have no data, and for every test. Writes the Kaggle train layout, images beside
their signals, so that `--sim_root OUT --csv_root OUT` works:

    OUT/train.csv                         id,fs,sig_len
    OUT/{id}/{id}.csv                     I,II,III,aVR,aVL,aVF,V1..V6 in mV (3 decimals, NaN = empty)
    OUT/{id}/{id}-{k:04d}.png / .json     k = 1..images_per_id, ecg-image-kit JSON plus extra keys

Examples:
    python ecg_simulator.py --out data/sim --n 200 --seed 0
    python ecg_simulator.py --out data/sim_img --csv_root data/train --images_per_id 2

Conventions: pixel (row, col) has its center at integer coordinates (as in OpenCV), so
round(plotted_pixel) indexes the pixel the trace passes through. Rotation is positive clockwise
on screen, about `rotation_center`; `plotted_pixels` and bounding boxes are in final (rotated)
coordinates, `baseline_rows` and `grid_origin` in unrotated page coordinates.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import scipy.signal
from tqdm import tqdm

import ecg_signals

from ecg_page import (CAL_PULSE_MV, CAL_PULSE_S, LAYOUT_NAMES_HELP, LAYOUTS, LEADS, MM_PER_MV, MM_PER_S, PAGE_H_IN,
                      PAGE_W_IN, PAPER_SPEEDS_MM_S, SECONDS, STANDARD, layout_at_speed)

PRIMARY_LEADS = ['I', 'II', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']  # the rest follow from I and II
LAYOUT = [list(row) for row in STANDARD.rows]   # the Kaggle CSVs' columns: rows of short strips (NaN masking)
FULL_MODE_LEAD = STANDARD.rhythm[0]
N_COLUMNS = STANDARD.n_columns
TOP_ROW_MM = 50.0                # pages of many rows start their first row this far down (header above)
BOTTOM_ROW_MM = PAGE_H_IN * 25.4 - 21.0   # the bottom row's 0 mV line (the rhythm strip's), before jitter
MAX_ROW_SPACING_MM = 36.0        # the standard page's row pitch
PX_SHIFT = 4                     # cv2 sub-pixel bits: coordinates are drawn to 1/16 px

FS_CHOICES = (250, 256, 500, 512, 1000, 1025)
DPI_CHOICES = (100, 150, 200, 250, 300)
STYLES = ('classic', 'color', 'bw', 'nogrid', 'noisy')

# Image knobs accepted by render_image (and passed through generate); the CLI exposes each.
DEFAULT_KNOBS = dict(
    dpi_choices=DPI_CHOICES,
    max_rotation=5.0,            # degrees; angle drawn uniformly in [-max, +max]
    layouts=(STANDARD.name,),    # ecg_page.LAYOUTS names; each image draws one, uniformly
    gains=(MM_PER_MV,),          # mm per mV; each image draws one of them, uniformly
    speeds=(MM_PER_S,),          # paper speeds in mm/s; each image draws one (50: the layout's 5 s twin)
    pulse_prob=1.0,              # pages with the 1 mV x 0.2 s calibration pulse (ecg-image-kit --calibration_pulse)
    style_probs=(0.4, 0.25, 0.1, 0.05, 0.2),  # classic, color, bw, nogrid, noisy
    noise_prob=0.5,              # gaussian sensor noise
    blur_prob=0.3,               # gaussian blur (focus, scanner)
    jpeg_prob=0.2,               # JPEG round trip artefacts
    tint_prob=0.5,               # paper tint and colour cast
    header_prob=0.7,             # header text line(s) at the top
    separator_prob=0.8,          # column separator ticks between leads
    line_width=(0.5, 2.0),       # trace width range in px at 200 dpi (scaled with dpi)
    jitter_mm=2.0,               # jitter of left margin and row positions
)

# RGB colour families; each is perturbed per image.
GRID_COLOURS = {  # name: (minor, major)
    'red': ((255, 205, 205), (235, 60, 60)),
    'pink': ((250, 215, 225), (240, 120, 150)),
    'orange': ((255, 220, 180), (245, 140, 40)),
    'green': ((200, 235, 205), (40, 160, 80)),
    'blue': ((200, 215, 245), (60, 100, 210)),
    'gray': ((215, 215, 215), (140, 140, 140)),
}
TRACE_COLOURS = {'black': (10, 10, 10), 'dark_blue': (20, 30, 100), 'dark_gray': (60, 60, 60)}


# ----------------------------------------------------------------------------------------------
# Signals: a 3-D heart-vector (dipole) model projected onto the lead directions
# ----------------------------------------------------------------------------------------------

def unit(frontal_deg, z):
    """Direction in the heart frame (x = patient's left, y = feet, z = anterior) from a frontal
    angle (0 = lead I, +90 = aVF) and an anterior component."""
    a = np.deg2rad(frontal_deg)
    v = np.array([np.cos(a), np.sin(a), z])
    return v / np.linalg.norm(v)


def lead_vectors(rng):
    """8 x 3 directions of I, II, V1..V6. Limb leads are exact (the derived leads depend on them);
    precordial electrodes sit a few degrees apart from patient to patient."""
    rows = [unit(0.0, 0.0), unit(60.0, 0.0)]
    for deg in (115.0, 95.0, 75.0, 55.0, 30.0, 5.0):   # V1..V6 in the horizontal plane
        a = np.deg2rad(deg + rng.normal(0.0, 4.0))
        # precordial electrodes are close to the heart: larger gain, slight inferior tilt
        rows.append(1.3 * np.array([np.cos(a), 0.15, np.sin(a)]))
    return np.array(rows)


def wave_params(rng, rr):
    """Per-record morphology: centers (s, relative to R), widths (s) and 3-D amplitudes (mV)."""
    axis = rng.uniform(-30.0, 100.0)   # QRS electrical axis, normal range with some deviation
    slow = np.sqrt(rr)                 # repolarization scales with cycle length (Bazett-like)
    centers = np.array([-rng.uniform(0.13, 0.20), -rng.uniform(0.025, 0.04), 0.0,
                        rng.uniform(0.025, 0.04), rng.uniform(0.26, 0.34) * slow])
    widths = np.array([rng.uniform(0.018, 0.03), rng.uniform(0.007, 0.012),
                       rng.uniform(0.009, 0.016), rng.uniform(0.008, 0.014),
                       rng.uniform(0.045, 0.075) * np.sqrt(slow)])
    vectors = np.array([
        rng.uniform(0.08, 0.25) * unit(rng.uniform(30, 75), rng.uniform(-0.1, 0.3)),      # P
        rng.uniform(0.05, 0.3) * unit(rng.uniform(150, 210), rng.uniform(0.3, 0.8)),      # septal q
        rng.uniform(0.7, 2.0) * unit(axis, rng.uniform(-0.5, 0.1)),                       # R
        rng.uniform(0.2, 0.8) * unit(axis + 180 + rng.uniform(-40, 40), rng.uniform(-1.0, -0.3)),
        rng.uniform(0.15, 0.5) * unit(axis + rng.uniform(-25, 25), rng.uniform(0.0, 0.6)),  # T
    ])
    return centers, widths, vectors


def beat_times(rng, rr):
    """R-peak times covering the 10 s window (and a beat beyond each edge), with RR jitter and
    respiratory sinus arrhythmia."""
    resp_period = rng.uniform(3.0, 6.0)
    t = -rng.uniform(0.0, rr) - rr
    times = []
    while t < SECONDS + 2 * rr:
        times.append(t)
        t += rr * (1.0 + 0.03 * rng.standard_normal() + 0.04 * np.sin(2 * np.pi * t / resp_period))
    return np.array(times)


def heart_vector(t, beats, beat_scale, centers, widths, vectors):
    """Sum of Gaussian waves over beats: (len(t), 3) dipole in mV."""
    dt = t[None, :] - beats[:, None]                        # beats x samples
    waves = np.stack([(beat_scale[:, None] * np.exp(-0.5 * ((dt - c) / w) ** 2)).sum(0)
                      for c, w in zip(centers, widths)], axis=1)   # samples x 5
    return waves @ vectors


def wander_and_noise(rng, t, n_leads):
    """Slight baseline wander (two slow sinusoids, < 0.06 mV a primary lead, so < 0.15 mV on the
    derived ones), white noise and sometimes a little mains hum."""
    out = np.zeros((len(t), n_leads))
    for _ in range(2):
        f = rng.uniform(0.05, 0.5, n_leads)
        out += rng.uniform(0.0, 0.03, n_leads) * np.sin(2 * np.pi * f * t[:, None] + rng.uniform(0, 2 * np.pi, n_leads))
    out += rng.uniform(0.003, 0.015, n_leads) * rng.standard_normal((len(t), n_leads))
    if rng.random() < 0.2:
        mains = rng.choice([50.0, 60.0])
        out += rng.uniform(0.0, 0.01, n_leads) * np.sin(2 * np.pi * mains * t[:, None] + rng.uniform(0, 2 * np.pi))
    return out


def derive_limb_leads(primary):
    """12-lead DataFrame from I, II, V1..V6 by Einthoven/Goldberger, so the leads are consistent."""
    I, II = primary['I'], primary['II']
    derived = {'III': II - I, 'aVR': -(I + II) / 2, 'aVL': I - II / 2, 'aVF': II - I / 2}
    return pd.DataFrame({lead: primary[lead] if lead in primary else derived[lead] for lead in LEADS})


# ----------------------------------------------------------------------------------------------
# Real-ECG findings: what real 12-lead records show and a healthy beat model lacks
# ----------------------------------------------------------------------------------------------

# each finding's share among records drawn with findings; amplitudes and durations from the clinical criteria
FINDING_PROBS = {
    'voltage': 0.6,   # QRS from low voltage (limb < 0.5 mV) to LVH (Sokolow-Lyon S V1 + R V5 > 3.5 mV)
    'bbb': 0.15,      # bundle-branch block: QRS >= 120 ms, RBBB's terminal R' in V1, LBBB's broad R in V6
    'st': 0.2,        # ST elevation or depression of 0.1-0.4 mV (ischaemia, pericarditis, repolarization)
    'af': 0.15,       # atrial fibrillation: no P, irregular RR, fibrillatory f waves of 0.02-0.15 mV at 4-9 Hz
    'rate': 0.2,      # bradycardia (32-45 bpm) or tachycardia (140-190 bpm)
    'pvc': 0.2,       # premature ventricular beats: early, wide (120-180 ms), 1.5-4 mV, discordant T
    'paced': 0.05,    # pacemaker spikes (about 1 ms, 0.5-5 mV) before wide paced QRS
    'wander': 0.35,   # baseline wander to 0.8 mV and electrode-motion drifts of 1-4 mV
    'emg': 0.25,      # muscle noise: 20-100 Hz, 0.02-0.12 mV
    'mains': 0.15,    # 50 / 60 Hz interference of 0.02-0.15 mV
}
FINDINGS = tuple(FINDING_PROBS)


@dataclass(frozen=True)
class Morphology:
    """One beat's waves in the dipole model: centers (s, relative to R), widths (s), 3-D amplitudes (mV);
    P, q, R, S, T, then any extra waves a finding adds (BBB's terminal R', an ST segment shift)."""
    centers: np.ndarray
    widths: np.ndarray
    vectors: np.ndarray

    def waves(self):
        return self.centers, self.widths, self.vectors

    def with_wave(self, center, width, vector):
        return Morphology(np.append(self.centers, center), np.append(self.widths, width),
                          np.vstack([self.vectors, vector]))


def draw_findings(rng, findings=FINDINGS):
    """The findings one record shows (at least one), each among `findings` by its FINDING_PROBS share."""
    shown = tuple(name for name in findings if rng.random() < FINDING_PROBS[name])
    return shown or (findings[int(rng.integers(len(findings)))],)


def scale_voltage(rng, morphology):
    """q, R and S scaled together by a log-uniform factor of 0.35-3 (low voltage to LVH)."""
    vectors = morphology.vectors.copy()
    vectors[1:4] *= np.exp(rng.uniform(np.log(0.35), np.log(3.0)))
    return replace(morphology, vectors=vectors)


def bundle_branch_block(rng, morphology):
    """QRS widened to 120-180 ms with a late wave: RBBB's rightward, anterior R' (rSR' in V1), or LBBB's
    leftward, posterior notch (broad notched R in V6); T discordant to the QRS."""
    widths, vectors = morphology.widths.copy(), morphology.vectors.copy()
    widths[1:4] *= rng.uniform(1.5, 2.2)
    r_axis = np.degrees(np.arctan2(vectors[2, 1], vectors[2, 0]))
    vectors[4] = -np.linalg.norm(vectors[4]) * vectors[2] / np.linalg.norm(vectors[2])
    morphology = replace(morphology, widths=widths, vectors=vectors)
    if rng.random() < 0.5:   # RBBB
        return morphology.with_wave(rng.uniform(0.05, 0.07), rng.uniform(0.015, 0.025),
                                    rng.uniform(0.3, 1.0) * unit(rng.uniform(150, 210), rng.uniform(0.6, 1.0)))
    return morphology.with_wave(rng.uniform(0.03, 0.05), rng.uniform(0.015, 0.025),
                                rng.uniform(0.5, 1.5) * unit(r_axis + rng.uniform(-20, 20), rng.uniform(-0.8, -0.4)))


def st_shift(rng, morphology):
    """A plateau between S and T along a random direction: ST raised in the leads it points to, lowered in
    the others."""
    return morphology.with_wave(rng.uniform(0.08, 0.14), rng.uniform(0.04, 0.07),
                                rng.uniform(0.1, 0.4) * unit(rng.uniform(-180, 180), rng.uniform(-1, 1)))


def no_p_waves(rng, morphology):
    """Atrial fibrillation has no P wave (its f waves are drawn with the artefacts)."""
    vectors = morphology.vectors.copy()
    vectors[0] = 0.0
    return replace(morphology, vectors=vectors)


# paced beats start in the right ventricle: wide, LBBB-like or RBBB-like QRS as a block draws them
RESHAPES = {'voltage': scale_voltage, 'bbb': bundle_branch_block, 'paced': bundle_branch_block, 'st': st_shift,
            'af': no_p_waves}


def irregular_beats(rng, rr):
    """R times of atrial fibrillation: each RR drawn on its own (a coefficient of variation near 0.2)."""
    t, times = -rng.uniform(0.0, rr) - rr, []
    while t < SECONDS + 2 * rr:
        times.append(t)
        t += rr * float(np.clip(rng.lognormal(0.0, 0.22), 0.45, 1.9))
    return np.array(times)


def ectopic_beats(rng, beats, rr):
    """(mask of the beats kept normal, times of the ectopic ones): 1-4 beats come 20-40 % early, with a full
    compensatory pause (the next beat keeps its time)."""
    normal = np.ones(len(beats), bool)
    inside = np.flatnonzero((beats > 0.3) & (beats < SECONDS - 0.3))
    chosen = rng.choice(inside, size=min(len(inside), int(rng.integers(1, 5))), replace=False)
    normal[chosen] = False
    return normal, beats[chosen] - rng.uniform(0.2, 0.4, len(chosen)) * rr


def ectopic_morphology(rng):
    """A ventricular beat: no P, a wide QRS of 1.5-4 mV in its own direction, T opposite to it."""
    direction = unit(rng.uniform(-180, 180), rng.uniform(-1, 1))
    centers = np.array([0.0, rng.uniform(0.04, 0.06), rng.uniform(0.25, 0.32)])
    widths = np.array([rng.uniform(0.025, 0.04), rng.uniform(0.02, 0.03), rng.uniform(0.06, 0.09)])
    vectors = np.array([rng.uniform(1.5, 4.0) * direction, -0.3 * direction, -rng.uniform(0.3, 0.8) * direction])
    return Morphology(centers, widths, vectors)


def pacing_spikes(rng, t, beats, morphology, fs):
    """(T, 3) pacemaker spikes 40-60 ms before each R, about 1 ms wide (at least one sample, as a recorder's
    filter leaves them), 0.5-5 mV along one direction."""
    direction = rng.uniform(0.5, 5.0) * unit(rng.uniform(-180, 180), rng.uniform(-1, 1))
    width = max(0.001, 0.6 / fs)
    return heart_vector(t, beats - rng.uniform(0.04, 0.06), np.ones(len(beats)), [0.0], [width], direction[None])


def artefacts(rng, t, fs, shown):
    """(T, 8) what the recording adds on top of the heart, per primary lead: f waves, wander and
    electrode-motion drift, muscle noise, mains."""
    out = np.zeros((len(t), len(PRIMARY_LEADS)))
    if 'af' in shown:
        f = rng.uniform(4.0, 9.0) + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t)
        wave = np.sin(2 * np.pi * np.cumsum(f) / fs)
        out += wave[:, None] * rng.uniform(0.02, 0.15) * np.r_[0.5, 0.8, 1.0, 0.8, 0.5, 0.4, 0.3, 0.3]
    if 'wander' in shown:
        out += baseline_drift(rng, t)
    if 'emg' in shown:
        out += muscle_noise(rng, len(t), fs)
    if 'mains' in shown:
        out += rng.uniform(0.02, 0.15, out.shape[1]) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t[:, None]
                                                              + rng.uniform(0, 2 * np.pi))
    return out


def baseline_drift(rng, t):
    """(T, 8) wander of up to 0.8 mV (0.05-0.4 Hz: breathing, movement) and, in one lead out of two records,
    an electrode-motion drift of 1-4 mV that decays over a second or two."""
    n = len(PRIMARY_LEADS)
    out = rng.uniform(0.1, 0.8, n) * np.sin(2 * np.pi * rng.uniform(0.05, 0.4, n) * t[:, None]
                                            + rng.uniform(0, 2 * np.pi, n))
    if rng.random() < 0.5:
        start, lead = rng.uniform(0.0, SECONDS - 1.0), int(rng.integers(n))
        after = np.clip(t - start, 0.0, None)
        out[:, lead] += (rng.choice([-1, 1]) * rng.uniform(1.0, 4.0) * (after > 0)
                         * (1 - np.exp(-after / 0.3)) * np.exp(-after / rng.uniform(1.0, 3.0)))
    return out


def muscle_noise(rng, n_samples, fs):
    """(T, 8) band-limited noise of 20-100 Hz (up to below Nyquist), 0.02-0.12 mV rms, in bursts."""
    high = min(100.0, 0.45 * fs)
    sos = scipy.signal.butter(4, [20.0, high], btype='bandpass', fs=fs, output='sos')
    noise = scipy.signal.sosfiltfilt(sos, rng.standard_normal((n_samples, len(PRIMARY_LEADS))), axis=0)
    noise /= noise.std(0, keepdims=True) + 1e-12
    bursts = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * np.arange(n_samples) / fs
                                + rng.uniform(0, 2 * np.pi)) ** 2
    return noise * bursts[:, None] * rng.uniform(0.02, 0.12)


def synthesize_record(rng, fs, findings_rng=None, findings=FINDINGS):
    """10 s of 12-lead ECG at fs Hz in mV: DataFrame of round(10 * fs) rows x LEADS. With findings_rng, the
    record also shows some of the real-ECG findings named in `findings` (draw_findings), drawn from that rng
    alone, so a record without them is the same whatever the findings' share."""
    sig_len = int(round(SECONDS * fs))
    t = np.arange(sig_len) / fs
    rr = 60.0 / rng.uniform(45.0, 140.0)
    shown = () if findings_rng is None else draw_findings(findings_rng, findings)
    if 'rate' in shown:
        rr = 60.0 / findings_rng.choice([findings_rng.uniform(32.0, 45.0), findings_rng.uniform(140.0, 190.0)])
    centers, widths, vectors = wave_params(rng, rr)
    beats = beat_times(rng, rr)
    if 'af' in shown:
        beats = irregular_beats(findings_rng, rr)
    beat_scale = 1.0 + 0.04 * rng.standard_normal(len(beats))
    morphology = Morphology(centers, widths, vectors)
    for name in (name for name in RESHAPES if name in shown):
        morphology = RESHAPES[name](findings_rng, morphology)
    normal = np.ones(len(beats), bool)
    if 'pvc' in shown:
        normal, ectopic = ectopic_beats(findings_rng, beats, rr)
    dipole = heart_vector(t, beats[normal], beat_scale[normal], *morphology.waves())
    if 'pvc' in shown:
        dipole += heart_vector(t, ectopic, np.ones(len(ectopic)), *ectopic_morphology(findings_rng).waves())
    if 'paced' in shown:
        dipole += pacing_spikes(findings_rng, t, beats, morphology, fs)
    primary = dipole @ lead_vectors(rng).T + wander_and_noise(rng, t, len(PRIMARY_LEADS))
    if shown:
        primary += artefacts(findings_rng, t, fs, shown)
    return derive_limb_leads(dict(zip(PRIMARY_LEADS, primary.T)))


def column_bounds(sig_len, j):
    """Half-open sample range [start, end) of layout column j."""
    return j * sig_len // N_COLUMNS, (j + 1) * sig_len // N_COLUMNS


def lead_column(lead):
    return next(row.index(lead) for row in LAYOUT if lead in row)


def nan_mask(df):
    """Kaggle training-CSV masking: lead II stays finite for 10 s, every other lead is NaN outside
    its 2.5 s column of the standard layout."""
    df = df.copy()
    for lead in LEADS:
        if lead == FULL_MODE_LEAD:
            continue
        start, end = column_bounds(len(df), lead_column(lead))
        keep = np.zeros(len(df), bool)
        keep[start:end] = True
        df.loc[~keep, lead] = np.nan
    return df


def round_mv(df):
    """Round to the 3 decimals the CSV holds (+0.0 turns -0.0 into 0.0), so images are drawn from
    exactly the values a loader reads back."""
    return df.round(3) + 0.0


# ----------------------------------------------------------------------------------------------
# Images: page geometry, grid, traces, text, rotation, degradations, JSON
# ----------------------------------------------------------------------------------------------

def row_pitch_mm(layout):
    """Distance between the rows of a layout's page, before jitter."""
    n_rows = len(layout.rows) + len(layout.rhythm)
    return min(MAX_ROW_SPACING_MM, (BOTTOM_ROW_MM - TOP_ROW_MM) / max(n_rows - 1, 1))


def fitting_gains(gains, layout):
    """The gains whose 1 mV pulse fits between the layout's rows (no printer draws a 12 x 1 page at
    20 mm/mV: the 20 mm pulses would cross the rows above); the smallest one if none does."""
    fitting = [gain for gain in gains if gain * CAL_PULSE_MV <= row_pitch_mm(layout)]
    return fitting or [min(gains)]


def page_geometry(dpi, rng, jitter_mm, layout=STANDARD, gain=MM_PER_MV):
    """Page size and where everything goes (unrotated px). Row baselines and the left margin
    jitter a little per image, like different printers/templates; pages of many rows (6 x 2, 12 x 1)
    pack them closer than the standard page's 36 mm."""
    px_per_mm = dpi / 25.4
    geom = dict(dpi=int(dpi), width=int(round(PAGE_W_IN * dpi)), height=int(round(PAGE_H_IN * dpi)),
                px_per_mm=px_per_mm, x_grid=5 * px_per_mm, y_grid=5 * px_per_mm)
    geom['gain'] = float(gain)
    geom['px_per_mv'] = gain * px_per_mm            # = 2 * y_grid at the standard 10 mm/mV
    geom['px_per_s'] = layout.paper_speed_mm_s * px_per_mm   # = 5 * x_grid at 25 mm/s
    x_cal_mm = 10.0 + rng.uniform(-1, 1) * jitter_mm
    geom['x_cal'] = x_cal_mm * px_per_mm
    geom['x_start'] = geom['x_cal'] + CAL_PULSE_S * geom['px_per_s']   # pulse, then the trace
    rhythm_mm = BOTTOM_ROW_MM + rng.uniform(-1, 1) * jitter_mm * 2
    n_short = len(layout.rows)   # rows of short strips above the rhythm strip(s)
    n_rows = n_short + len(layout.rhythm)
    pitch = row_pitch_mm(layout)
    spacing_mm = pitch + rng.uniform(-1, 1) * jitter_mm * 2 * pitch / MAX_ROW_SPACING_MM
    # the bottom row (the rhythm strip, else the last short row) sits at rhythm_mm; short rows jitter
    rows_mm = [rhythm_mm - (n_rows - 1 - r) * spacing_mm + (rng.uniform(-0.5, 0.5) * jitter_mm if r < n_short else 0.0)
               for r in range(n_rows)]
    geom['row_baselines'] = [m * px_per_mm for m in rows_mm]
    # a major intersection anywhere in the first large square: the grid is not tied to the trace
    geom['grid_origin'] = [rng.uniform(0, geom['y_grid']), rng.uniform(0, geom['x_grid'])]
    return geom


def lead_entries(sig_len, layout=STANDARD):
    """(lead, layout row, layout column, start, end) in ecg-image-kit's order: bottom grid row
    first, then up, then the rhythm strip. Columns show consecutive sample ranges, or each the first
    ones (layout.restart_columns, as ecg-image-kit's 2-column page)."""
    entries = []
    n_columns = layout.n_columns
    shown = int(round(sig_len * layout.seconds / SECONDS))   # a 50 mm/s page shows the first 5 s
    for r in reversed(range(len(layout.rows))):
        for j, lead in enumerate(layout.rows[r]):
            bounds = (0, shown // n_columns) if layout.restart_columns else \
                (j * shown // n_columns, (j + 1) * shown // n_columns)
            entries.append((lead, r, j) + bounds)
    for k, lead in enumerate(layout.rhythm):
        entries.append((lead, len(layout.rows) + k, 0, 0, shown))
    return entries


def lead_points(values, fs, start, end, col_j, baseline, geom, column_s):
    """(N, 2) float [x, y] of samples start..end-1, unrotated. Columns are contiguous: column j
    begins at x_start + j * column_s seconds regardless of where its first sample falls."""
    n = np.arange(start, end)
    x = geom['x_start'] + (n - start) / fs * geom['px_per_s'] + col_j * column_s * geom['px_per_s']
    y = baseline - values[start:end] * geom['px_per_mv']
    return np.stack([x, y], axis=1)


def to_cv_points(xy):
    return np.round(xy * (1 << PX_SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def finite_runs(xy):
    """Split a polyline at NaN samples: NaN points are not drawn."""
    ok = np.isfinite(xy).all(1)
    if ok.all():
        return [xy]
    edges = np.flatnonzero(np.diff(np.r_[0, ok.astype(np.int8), 0]))
    return [xy[a:b] for a, b in zip(edges[::2], edges[1::2]) if b - a >= 2]


def line_coverage(coords, origin, spacing, width):
    """Fraction of each pixel (centers at integer coords) covered by lines of `width` px at
    origin + k * spacing: exact box-filter antialiasing, vectorized along one axis."""
    d = np.abs(((coords - origin) / spacing + 0.5) % 1.0 - 0.5) * spacing
    return np.clip(np.minimum(d + 0.5, width / 2) - np.maximum(d - 0.5, -width / 2), 0.0, 1.0).astype(np.float32)


GRID_LEVELS = 15   # antialiasing levels of each grid layer; (minor, major) pairs index one 256-entry LUT


def grid_lut(paper_rgb, minor_rgb, major_rgb):
    """1 x 256 x 3 uint8 colour of a pixel covered a/15 by minor and b/15 by major lines at a*16+b."""
    paper = np.asarray(paper_rgb, float)
    minor = paper if minor_rgb is None else np.asarray(minor_rgb, float)
    major = paper if major_rgb is None else np.asarray(major_rgb, float)
    cov = np.arange(16) / GRID_LEVELS
    colour = paper + np.minimum(cov, 1.0)[:, None, None] * (minor - paper)          # 16 x 1 x 3
    colour = colour + np.minimum(cov, 1.0)[None, :, None] * (major - colour)        # 16 x 16 x 3
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8).reshape(1, 256, 3)


def draw_paper(geom, paper_rgb, minor_rgb, major_rgb, minor_w, major_w):
    """uint8 H x W x 3 paper with a 1 mm / 5 mm grid (layers with colour None are absent).
    The grid is separable, so coverage is computed per row and per column and combined through a
    colour lookup table: no float image is ever built."""
    h, w = geom['height'], geom['width']
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    oy, ox = geom['grid_origin']
    quantize = lambda cov: np.rint(cov * GRID_LEVELS).astype(np.uint8)
    idx = np.zeros((h, w), np.uint8)
    for rgb, spacing, width, weight in ((minor_rgb, geom['px_per_mm'], minor_w, 16),
                                        (major_rgb, geom['x_grid'], major_w, 1)):
        if rgb is None:
            continue
        idx += np.maximum.outer(quantize(line_coverage(rows, oy, spacing, width)),
                                quantize(line_coverage(cols, ox, spacing, width))) * np.uint8(weight)
    return cv2.LUT(cv2.merge([idx, idx, idx]), grid_lut(paper_rgb, minor_rgb, major_rgb))


def blend_marks(img, mask, rgb, alpha):
    """Blend the trace colour into img where the antialiased mask is set (in place). Only the few
    percent of pixels that carry ink are touched."""
    flat, ink = img.reshape(-1, 3), np.flatnonzero(mask)
    a = mask.ravel()[ink].astype(np.float32)[:, None] * np.float32(alpha / 255.0)
    under = flat[ink].astype(np.float32)
    flat[ink] = np.clip(under + a * (np.asarray(rgb, np.float32) - under) + 0.5, 0, 255).astype(np.uint8)
    return img


def pick_style(rng, knobs):
    """Style family and colours: paper, minor/major grid (None = absent), trace."""
    p = np.asarray(knobs['style_probs'], float)
    style = STYLES[rng.choice(len(STYLES), p=p / p.sum())]
    jitter = lambda rgb, s=12: tuple(float(np.clip(c + rng.uniform(-s, s), 0, 255)) for c in rgb)
    paper = (255.0, 255.0, 255.0)
    if rng.random() < knobs['tint_prob']:   # cream, bluish or grayish paper
        paper = tuple(float(255 - x) for x in rng.uniform(0, [12, 18, 30])[rng.permutation(3)])
    if style == 'bw':
        minor = (float(rng.uniform(185, 230)),) * 3 if rng.random() < 0.8 else None
        major = (float(rng.uniform(90, 170)),) * 3
    elif style == 'nogrid':
        minor = major = None
    else:
        names = ['red', 'pink'] if style == 'classic' else list(GRID_COLOURS)
        minor, major = (jitter(c) for c in GRID_COLOURS[names[rng.integers(len(names))]])
    trace_name = list(TRACE_COLOURS)[rng.choice(3, p=[0.6, 0.2, 0.2])]
    trace = jitter(TRACE_COLOURS[trace_name], 8)
    if style == 'bw':
        trace = (float(rng.uniform(0, 40)),) * 3
    return style, paper, minor, major, trace


def draw_lead_label(mask, text, x, y_top, font, scale, thick):
    """putText with its top-left at (x, y_top); returns its box as [row, col] corners."""
    (tw, th), below = cv2.getTextSize(text, font, scale, thick)
    org = (int(round(x)), int(round(y_top + th)))
    cv2.putText(mask, text, org, font, scale, 255, thick, cv2.LINE_AA)
    return [[org[1] - th, org[0]], [org[1] - th, org[0] + tw], [org[1] + below, org[0] + tw], [org[1] + below, org[0]]]


def header_lines(rng, gain=MM_PER_MV, speed=MM_PER_S):
    """A few lines of the sort printed above a real ECG: speed and gain, an id, a date, intervals."""
    tokens = [
        f'{speed:g}mm/s', f'{gain:g}mm/mV', f'ID: {rng.integers(10**6, 10**8)}',
        f'{rng.integers(2005, 2025)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} '
        f'{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}',
        f'HR {rng.integers(45, 140)} bpm', f'PR {rng.integers(120, 210)} ms', f'QRS {rng.integers(70, 120)} ms',
        f'QT/QTc {rng.integers(320, 440)}/{rng.integers(380, 470)} ms', f'Age: {rng.integers(18, 95)}',
        ['Sex: M', 'Sex: F'][rng.integers(2)], '0.05-150 Hz', ['Sinus rhythm', 'Normal ECG', 'Unconfirmed'][rng.integers(3)],
    ]
    order = rng.permutation(len(tokens))
    n_lines = int(rng.integers(1, 4))
    per_line = len(tokens) // n_lines
    return ['   '.join(tokens[k] for k in order[i * per_line:(i + 1) * per_line][:5]) for i in range(n_lines)]


def draw_page_marks(mask, geom, rng, knobs, sig_len, layout=STANDARD):
    """Calibration pulses, column separators, lead labels and header into the trace mask.
    Returns the lead-label boxes in lead_entries order."""
    ppmv, mm = geom['px_per_mv'], geom['px_per_mm']
    font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX][rng.integers(2)]
    scale = rng.uniform(2.6, 3.6) * mm / 22.0        # cap height ~3 mm (22 px at scale 1)
    thick = max(1, int(round(scale * rng.uniform(1.2, 2.2))))
    for base in geom['row_baselines'] if geom['pulse'] else []:  # 1 mV x 0.2 s pulse, then the trace starts
        pulse = np.array([[geom['x_cal'], base], [geom['x_cal'], base - CAL_PULSE_MV * ppmv],
                          [geom['x_start'], base - CAL_PULSE_MV * ppmv], [geom['x_start'], base]])
        cv2.polylines(mask, [to_cv_points(pulse)], False, 255, max(1, int(round(0.25 * mm))), cv2.LINE_AA, PX_SHIFT)
    if rng.random() < knobs['separator_prob']:
        half = rng.uniform(0.25, 0.4) * ppmv
        for base in geom['row_baselines'][:len(layout.rows)]:
            for j in range(1, layout.n_columns):
                x = geom['x_start'] + j * layout.column_seconds * geom['px_per_s']
                seg = np.array([[x, base - half], [x, base + half]])
                cv2.polylines(mask, [to_cv_points(seg)], False, 255, max(1, int(round(0.5 * mm))), cv2.LINE_AA, PX_SHIFT)
    label_dy = rng.uniform(3.5, 6.0) * mm
    boxes = []
    for lead, r, j, _, _ in lead_entries(sig_len, layout):
        x = geom['x_start'] + j * layout.column_seconds * geom['px_per_s'] + mm * rng.uniform(0.0, 1.5)
        boxes.append(draw_lead_label(mask, layout.label(lead), x, geom['row_baselines'][r] + label_dy, font, scale,
                                     thick))
    if rng.random() < knobs['header_prob']:
        y = rng.uniform(6, 12) * mm
        for line in header_lines(rng, geom['gain'], layout.paper_speed_mm_s):
            draw_lead_label(mask, line, geom['x_cal'], y, font, scale * 0.9, thick)
            y += 6.0 * mm
    return boxes


def trace_stroke(rng, knobs, dpi):
    """cv2 thickness and opacity for a trace of the drawn physical width. An antialiased cv2 line
    of thickness 1 is ~1.3 px wide, so thinner traces are drawn fainter instead of thinner."""
    width = rng.uniform(*knobs['line_width']) * dpi / 200.0
    thickness = 1 if width < 2.2 else int(round(width - 1.0))
    alpha = float(np.clip(0.75 + 0.25 * (width - 0.5) / 0.5, 0.75, 1.0))
    return width, thickness, alpha


def rotation_matrix(geom, angle_deg):
    """2 x 3 affine for a clockwise-on-screen rotation by angle_deg about the image center
    (cv2 calls counter-clockwise positive, hence the minus)."""
    center = ((geom['width'] - 1) / 2.0, (geom['height'] - 1) / 2.0)
    return cv2.getRotationMatrix2D(center, -angle_deg, 1.0)


def apply_affine(xy, m):
    return xy @ m[:, :2].T + m[:, 2]


def tone_lut(cast, contrast, brightness):
    """Per-channel colour cast, contrast and brightness as one 1 x 256 x 3 lookup table."""
    v = np.arange(256, dtype=float)[:, None] * np.asarray(cast, float)[None, :]
    return np.clip(np.rint((v - 128.0) * contrast + 128.0 + brightness), 0, 255).astype(np.uint8).reshape(1, 256, 3)


def degrade(img, rng, knobs, style, dpi):
    """Scanner/photo effects on the uint8 RGB page: blur, colour cast, brightness/contrast,
    noise, JPEG. 'noisy' gets all of them, stronger."""
    noisy = style == 'noisy'
    s = dpi / 200.0
    if noisy or rng.random() < knobs['blur_prob']:
        sigma = rng.uniform(0.6, 1.4) * s if noisy else rng.uniform(0.3, 1.0) * s
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    cast = np.ones(3)
    if noisy or rng.random() < knobs['tint_prob']:
        spread = 0.12 if noisy else 0.06
        cast = rng.uniform(1 - spread, 1 + spread / 3, 3)
    contrast = rng.uniform(0.75, 1.1) if noisy else rng.uniform(0.9, 1.1)
    brightness = rng.uniform(-30, 15) if noisy else rng.uniform(-10, 10)
    img = cv2.LUT(img, tone_lut(cast, contrast, brightness))
    if noisy or rng.random() < knobs['noise_prob']:
        sigma = rng.uniform(8, 20) if noisy else rng.uniform(1.5, 7)
        noise = np.rint(sigma * rng.standard_normal(img.shape[:2], dtype=np.float32)).astype(np.int16)
        img = cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)   # saturating
    if (rng.random() < 0.7) if noisy else (rng.random() < knobs['jpeg_prob']):
        quality = int(rng.uniform(25, 60) if noisy else rng.uniform(40, 90))
        ok, buf = cv2.imencode('.jpg', cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if style == 'bw':
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return img


def box_corners(top, left, bottom, right):
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom]], float)  # [x, y]


def corners_json(xy):
    """ecg-image-kit corner dict: '0'..'3' -> [row, col] ints."""
    return {str(k): [int(round(y)), int(round(x))] for k, (x, y) in enumerate(xy)}


def check_knobs(knobs):
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f'unknown image knob(s): {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}')
    return {**DEFAULT_KNOBS, **knobs}


def render_image(signals_df, fs, rng, **knobs):
    """Paper-ECG image of a 10 s 12-lead record in one of knobs['layouts'] (default the standard 3 x 4 +
    lead II rhythm strip). Returns (H x W x 3 uint8 RGB, ecg-image-kit style JSON dict with the extra keys)."""
    knobs = check_knobs(knobs)
    fs = float(fs)
    signals = {lead: signals_df[lead].to_numpy(np.float64) for lead in LEADS}
    sig_len = len(signals_df)
    dpi = int(knobs['dpi_choices'][rng.integers(len(knobs['dpi_choices']))])
    style, paper, minor, major, trace_rgb = pick_style(rng, knobs)
    names, speeds = knobs['layouts'], knobs['speeds']
    layout = LAYOUTS[names[rng.integers(len(names))] if len(names) > 1 else names[0]]
    layout = layout_at_speed(layout, float(speeds[rng.integers(len(speeds))] if len(speeds) > 1 else speeds[0]))
    gains = fitting_gains(knobs['gains'], layout)
    gain = float(gains[rng.integers(len(gains))] if len(gains) > 1 else gains[0])
    geom = page_geometry(dpi, rng, knobs['jitter_mm'], layout, gain)
    geom['pulse'] = knobs['pulse_prob'] >= 1 or rng.random() < knobs['pulse_prob']   # the trace starts where it ends
    minor_w, major_w = rng.uniform(0.6, 1.0) * dpi / 200.0, rng.uniform(1.0, 2.0) * dpi / 200.0
    img = draw_paper(geom, paper, minor, major, minor_w, major_w)

    # every dark mark goes into one antialiased mask, blended once in the trace colour
    mask = np.zeros((geom['height'], geom['width']), np.uint8)
    label_boxes = draw_page_marks(mask, geom, rng, knobs, sig_len, layout)
    width, thickness, alpha = trace_stroke(rng, knobs, dpi)
    entries, points = lead_entries(sig_len, layout), []
    for lead, r, j, start, end in entries:
        xy = lead_points(layout.sign(lead) * signals[lead], fs, start, end, j, geom['row_baselines'][r], geom,
                         layout.column_seconds)
        points.append(xy)
        runs = finite_runs(xy)
        if runs:
            cv2.polylines(mask, [to_cv_points(run) for run in runs], False, 255, thickness, cv2.LINE_AA, PX_SHIFT)
    blend_marks(img, mask, trace_rgb, alpha)

    angle = float(rng.uniform(-1, 1) * knobs['max_rotation']) + 0.0   # no -0.0 in the JSON
    m = rotation_matrix(geom, angle)
    if angle != 0.0:
        fill = tuple(float(v) for v in ((rng.uniform(0, 60),) * 3 if rng.random() < 0.5 else paper))
        img = cv2.warpAffine(img, m, (geom['width'], geom['height']), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    img = degrade(img, rng, knobs, style, dpi)

    meta = dict(style=style, paper=paper, minor=minor, major=major, trace=trace_rgb, width_px=width,
                angle=angle, matrix=m, label_boxes=label_boxes, layout=layout)
    return img, image_json(fs, geom, entries, points, meta, knobs)


def image_json(fs, geom, entries, points, meta, knobs):
    """The ecg-image-kit JSON (same key names and types) plus rotation/grid/baseline keys."""
    m, ppmv = meta['matrix'], geom['px_per_mv']
    leads = []
    for (lead, r, j, start, end), xy, tbox in zip(entries, points, meta['label_boxes']):
        base = geom['row_baselines'][r]
        # NaN samples (not drawn) are listed at their 0 mV position; the CSV says they are NaN
        xy = np.where(np.isfinite(xy), xy, np.stack([xy[:, 0], np.full(len(xy), base)], 1))
        top, bottom = xy[:, 1].min(), xy[:, 1].max()
        left, right = xy[:, 0].min(), xy[:, 0].max()
        if j == 0:   # like ecg-image-kit, the first column's box includes its calibration pulse
            top, bottom, left = min(top, base - CAL_PULSE_MV * ppmv), max(bottom, base), geom['x_cal']
        box = box_corners(np.floor(top), np.floor(left), np.ceil(bottom), np.ceil(right))
        final = np.round(apply_affine(xy, m), 3)
        leads.append({
            'lead_bounding_box': corners_json(apply_affine(box, m)),
            'text_bounding_box': corners_json(apply_affine(np.array(tbox, float)[:, ::-1], m)),
            'lead_name': lead, 'start_sample': int(start), 'end_sample': int(end),
            'plotted_pixels': final[:, ::-1].tolist(),
        })
    rotate = knobs['max_rotation']
    return {
        'sampling_frequency': fs, 'width': geom['width'], 'height': geom['height'],
        'grid_line_color_major': [round(c, 2) for c in meta['major']] if meta['major'] else [],
        'grid_line_color_minor': [round(c, 2) for c in meta['minor']] if meta['minor'] else [],
        'ecg_plot_color': [round(c, 2) for c in meta['trace']],
        'x_grid': geom['x_grid'], 'y_grid': geom['y_grid'], 'resolution': geom['dpi'], 'pad_inches': 0,
        'dc_pulse': bool(geom['pulse']), 'bw': meta['style'] == 'bw', 'gridlines': meta['major'] is not None,
        'number_of_columns_in_image': meta['layout'].n_columns,
        'full_mode_lead': meta['layout'].rhythm[0] if meta['layout'].rhythm else 'None',
        'rotate': int(rotate) if float(rotate).is_integer() else float(rotate),
        'leads': leads,
        # extra keys (not in ecg-image-kit)
        'rotation_deg': meta['angle'],
        'rotation_center': [(geom['height'] - 1) / 2.0, (geom['width'] - 1) / 2.0],
        'grid_origin': [round(v, 4) for v in geom['grid_origin']],
        'style': meta['style'], 'layout': meta['layout'].name, 'gain_mm_mv': geom['gain'],
        'paper_speed_mm_s': meta['layout'].paper_speed_mm_s,
        'baseline_rows': [round(geom['row_baselines'][r], 4) for _, r, _, _, _ in entries],
        'trace_width_px': round(meta['width_px'], 3),
        'paper_color': [round(c, 2) for c in meta['paper']],
    }


# ----------------------------------------------------------------------------------------------
# Output folder: records, images, train.csv; parallel and deterministic
# ----------------------------------------------------------------------------------------------

def write_images(df, fs, rec_id, rec_dir, seed, i, images_per_id, knobs):
    for k in range(1, images_per_id + 1):
        img, meta = render_image(df, fs, np.random.default_rng([seed, i, k]), **knobs)
        stem = rec_dir / f'{rec_id}-{k:04d}'
        cv2.imwrite(str(stem) + '.png', cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
        with open(str(stem) + '.json', 'w') as f:
            json.dump(meta, f, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class SignalKnobs:
    """What the simulated signals are: sampling rates drawn from, the share of NaN-masked CSVs, and the share
    of records with real-ECG findings (and which findings)."""
    fs_choices: tuple = FS_CHOICES
    nan_mask_prob: float = 0.5
    findings_prob: float = 0.0
    findings: tuple = FINDINGS


def findings_rng_of(seed, i, signal_knobs):
    """Record i's own rng for its findings (None: a healthy record), apart from rng([seed, i]) so records
    without findings stay the same whatever the share."""
    rng = np.random.default_rng([seed, i, 0, 1])
    return rng if rng.random() < signal_knobs.findings_prob else None


def make_sim_record(i, out, seed, images_per_id, signal_knobs, knobs):
    """Record i: signals from rng([seed, i]) (and its findings' rng), CSV, then its images."""
    rng = np.random.default_rng([seed, i])
    fs_choices, nan_mask_prob = signal_knobs.fs_choices, signal_knobs.nan_mask_prob
    fs = int(fs_choices[rng.integers(len(fs_choices))])
    rec_id = str(1000000 * (seed + 1) + i)
    full = round_mv(synthesize_record(rng, fs, findings_rng_of(seed, i, signal_knobs), signal_knobs.findings))
    standard = set(knobs['layouts']) == {STANDARD.name} and set(knobs.get('speeds', (MM_PER_S,))) == {MM_PER_S}
    masked = rng.random() < nan_mask_prob and standard
    df = nan_mask(full) if masked else full
    rec_dir = Path(out) / rec_id
    rec_dir.mkdir(parents=True, exist_ok=True)
    ecg_signals.write_signal_csv(df, rec_dir / f'{rec_id}.csv')
    # pages draw the whole signal: the standard page shows just what the masked CSV keeps, and other
    # layouts show every lead as a printer would (the CSV's NaN samples are left out of the loss)
    write_images(full, fs, rec_id, rec_dir, seed, i, images_per_id, knobs)
    return rec_id, str(fs), str(len(df))


def make_existing_record(i, rows, csv_root, out, seed, images_per_id, knobs):
    """Record i of csv_root: copy its CSV into OUT (unless OUT is csv_root) and render images."""
    rec_id, fs, sig_len = rows[i]
    src = Path(csv_root) / rec_id / f'{rec_id}.csv'
    df = ecg_signals.read_record_csv(src, int(float(sig_len)))
    rec_dir = Path(out) / rec_id
    rec_dir.mkdir(parents=True, exist_ok=True)
    dst = rec_dir / f'{rec_id}.csv'
    if not (dst.exists() and os.path.samefile(src, dst)):
        shutil.copyfile(src, dst)
    write_images(df, float(fs), rec_id, rec_dir, seed, i, images_per_id, knobs)
    return rec_id, fs, sig_len


def quiet_worker():
    cv2.setNumThreads(1)   # one process per core already; avoid oversubscription


def run_jobs(job, count, workers, progress):
    bar = partial(tqdm, total=count, desc='simulating', unit='rec', disable=not progress,
                  mininterval=0.1 if sys.stderr.isatty() else 30.0)   # a log file gets a line every 30 s
    if workers <= 1 or count <= 1:
        return [r for r in bar(map(job, range(count)))]
    with Pool(workers, initializer=quiet_worker) as pool:
        return [r for r in bar(pool.imap(job, range(count), chunksize=1))]


def generate(out, n=None, seed=0, images_per_id=1, workers=1, csv_root=None, progress=False,
             signal_knobs=SignalKnobs(), **knobs):
    """Write n simulated records (or render the records of csv_root) into out; returns the ids.
    Deterministic in seed whatever the worker count. signal_knobs: what the simulated signals are (rates,
    NaN masks, the share with real-ECG findings); knobs: how the pages are drawn (DEFAULT_KNOBS)."""
    knobs = check_knobs(knobs)
    if seed < 0:
        raise ValueError('seed must be >= 0')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if csv_root is not None:
        rows = ecg_signals.read_csv_index(csv_root, n)
        job = partial(make_existing_record, rows=rows, csv_root=str(csv_root), out=str(out), seed=seed,
                      images_per_id=images_per_id, knobs=knobs)
        count = len(rows)
    else:
        if n is None:
            raise ValueError('n is required without csv_root')
        job = partial(make_sim_record, out=str(out), seed=seed, images_per_id=images_per_id,
                      signal_knobs=signal_knobs, knobs=knobs)
        count = n
    results = run_jobs(job, count, workers, progress)
    index = out / 'train.csv'
    same = csv_root is not None and index.exists() and os.path.samefile(Path(csv_root) / 'train.csv', index)
    if not same:   # never truncate the user's own train.csv when rendering in place
        with open(index, 'w') as f:
            f.write('id,fs,sig_len\n' + ''.join(','.join(r) + '\n' for r in results))
    return [r[0] for r in results]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='output folder (Kaggle train layout)')
    p.add_argument('--n', type=int, default=None, help='records to simulate (with --csv_root: first n, default all)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--images_per_id', type=int, default=1)
    p.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument('--csv_root', default=None, help='render images for existing signals DIR/train.csv + DIR/{id}/{id}.csv')
    p.add_argument('--fs_choices', type=int, nargs='+', default=list(FS_CHOICES))
    p.add_argument('--nan_mask_prob', type=float, default=0.5,
                   help='records NaN-masked like Kaggle training CSVs (standard pages only: on other layouts '
                        'a masked CSV would leave drawn strips without their truth)')
    p.add_argument('--findings_prob', type=float, default=0.0,
                   help='share of records with real-ECG findings: tall or low QRS, bundle-branch block, ST shift, '
                        'AF, brady/tachycardia, ectopic beats, pacing, wander and electrode drift, muscle noise, mains')
    p.add_argument('--findings', nargs='+', default=list(FINDINGS), choices=list(FINDINGS), metavar='NAME',
                   help='which findings those records draw from: ' + ' '.join(FINDINGS))
    p.add_argument('--dpi_choices', type=int, nargs='+', default=list(DPI_CHOICES))
    p.add_argument('--max_rotation', type=float, default=DEFAULT_KNOBS['max_rotation'], help='degrees')
    p.add_argument('--gains', type=float, nargs='+', default=list(DEFAULT_KNOBS['gains']), metavar='MM_PER_MV',
                   help='gains to draw, one per image at random (5, 10 or 20 mm/mV; written as gain_mm_mv)')
    p.add_argument('--speeds', type=float, nargs='+', default=list(DEFAULT_KNOBS['speeds']), metavar='MM_PER_S',
                   choices=list(PAPER_SPEEDS_MM_S), help='paper speeds to draw, one per image at random (25 or 50 '
                                                        'mm/s: a 50 mm/s page shows 5 s; paper_speed_mm_s in the JSON)')
    p.add_argument('--layouts', nargs='+', default=list(DEFAULT_KNOBS['layouts']), metavar='NAME',
                   help='page layouts to draw, one per image at random: ' + LAYOUT_NAMES_HELP + ', or all')
    p.add_argument('--style_probs', type=float, nargs=5, default=list(DEFAULT_KNOBS['style_probs']),
                   metavar=('CLASSIC', 'COLOR', 'BW', 'NOGRID', 'NOISY'))
    for knob in ('noise_prob', 'blur_prob', 'jpeg_prob', 'tint_prob', 'header_prob', 'separator_prob', 'jitter_mm',
                 'pulse_prob'):
        p.add_argument(f'--{knob}', type=float, default=DEFAULT_KNOBS[knob])
    p.add_argument('--line_width', type=float, nargs=2, default=list(DEFAULT_KNOBS['line_width']),
                   metavar=('MIN', 'MAX'), help='trace width in px at 200 dpi')
    args = p.parse_args(argv)
    if args.csv_root is None and args.n is None:
        p.error('--n is required unless --csv_root is given')
    return args


def main(argv=None):
    args = parse_args(argv)
    knobs = {k: getattr(args, k) for k in DEFAULT_KNOBS}
    knobs['dpi_choices'], knobs['style_probs'] = tuple(args.dpi_choices), tuple(args.style_probs)
    knobs['line_width'] = tuple(args.line_width)
    knobs['layouts'] = tuple(LAYOUTS) if args.layouts == ['all'] else tuple(args.layouts)
    knobs['gains'], knobs['speeds'] = tuple(args.gains), tuple(args.speeds)
    unknown = [name for name in knobs['layouts'] if name not in LAYOUTS]
    if unknown:
        raise ValueError(f'--layouts: unknown {unknown}; known: {", ".join(LAYOUTS)} or all')
    t0 = time.time()
    signal_knobs = SignalKnobs(tuple(args.fs_choices), args.nan_mask_prob, args.findings_prob, tuple(args.findings))
    ids = generate(args.out, args.n, args.seed, args.images_per_id, args.workers, csv_root=args.csv_root,
                   progress=True, signal_knobs=signal_knobs, **knobs)
    print(f'wrote {len(ids)} records x {args.images_per_id} image(s) to {args.out} in {time.time() - t0:.1f} s')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
