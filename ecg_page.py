"""The paper ECG's vocabulary, written once: leads, the 500 Hz x 10 s signal, paper speed and gain,
the page, and page layouts as data. Every other file of the toolkit imports these names.

A layout is rows of leads (each row split into equal columns over the 10 s) plus rhythm strips
(one lead over the whole 10 s, below the rows). The standard page is 3 x 4 + a lead II rhythm strip:

    I    aVR  V1  V4          columns at 0-2.5, 2.5-5, 5-7.5, 7.5-10 s
    II   aVL  V2  V5
    III  aVF  V3  V6
    II (rhythm strip, 10 s)
"""
from dataclasses import dataclass

import numpy as np

LEADS = ['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']   # a list: pandas reads a tuple as one key
N_LEADS = len(LEADS)
FS = 500                          # Hz of every signal the toolkit trains on and writes by default
SECONDS = 10.0
N_SAMPLES = int(FS * SECONDS)     # 5000 samples a lead
N_TRACES = N_LEADS + 1            # trace channels of targets and model: each lead's short strip + the rhythm strip
RHYTHM = N_LEADS                  # the rhythm strip's trace channel

MM_PER_S = 25.0                   # standard paper speed
MM_PER_MV = 10.0                  # standard gain
PAPER_SPEEDS_MM_S = (25.0, 50.0)
GAINS_MM_MV = (5.0, 10.0, 20.0)
MINOR_MM, MAJOR_MM = 1.0, 5.0     # grid squares
CAL_PULSE_MV, CAL_PULSE_S = 1.0, 0.2

PAGE_W_IN, PAGE_H_IN = 11.0, 8.5  # US letter, landscape: ecg-image-kit's and the simulator's page
PAGE_HEIGHT_MM = PAGE_H_IN * 25.4
PAGE_ASPECT = PAGE_W_IN / PAGE_H_IN


@dataclass(frozen=True)
class Layout:
    """Rows of leads (left to right, equal columns over SECONDS) and the rhythm strips below them."""
    name: str
    rows: tuple
    rhythm: tuple = ()

    @property
    def n_columns(self):
        return len(self.rows[0])

    @property
    def column_seconds(self):
        return SECONDS / self.n_columns

    def column_of(self, lead):
        """Column index of a lead's short strip (None if the rows do not show it)."""
        return next((row.index(lead) for row in self.rows if lead in row), None)

    def short_window(self, lead):
        """(start, end) seconds of a lead's short strip, half-open; None if not in the rows."""
        column = self.column_of(lead)
        if column is None:
            return None
        return column * self.column_seconds, (column + 1) * self.column_seconds

    def shown_mask(self, fs=FS, n_samples=N_SAMPLES):
        """(12, n_samples) bool: the samples t = n / fs that the page shows of each lead."""
        t = np.arange(n_samples) / fs
        mask = np.zeros((N_LEADS, n_samples), bool)
        for i, lead in enumerate(LEADS):
            window = self.short_window(lead)
            if window is not None:
                mask[i] |= (t >= window[0] - 1e-9) & (t < window[1] - 1e-9)
            if lead in self.rhythm:
                mask[i] = True
        return mask


STANDARD = Layout('3x4+II', rows=(('I', 'aVR', 'V1', 'V4'),
                                  ('II', 'aVL', 'V2', 'V5'),
                                  ('III', 'aVF', 'V3', 'V6')), rhythm=('II',))
LAYOUTS = {STANDARD.name: STANDARD}
