"""The paper ECG's vocabulary, written once: leads, the 500 Hz x 10 s signal, paper speed and gain,
the page, and page layouts as data. Every other file of the toolkit imports these names.

A layout is rows of leads (each row split into equal columns over the 10 s) plus rhythm strips (one lead
over the whole 10 s, below the rows; up to three, as clinics print II, V1 and V5). The standard page is
3 x 4 + a lead II rhythm strip:

    I    aVR  V1  V4          columns at 0-2.5, 2.5-5, 5-7.5, 7.5-10 s
    II   aVL  V2  V5
    III  aVF  V3  V6
    II (rhythm strip, 10 s)
"""
from dataclasses import dataclass, field, replace

import numpy as np

LEADS = ['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6']   # a list: pandas reads a tuple as one key
N_LEADS = len(LEADS)
FS = 500                          # Hz of every signal the toolkit trains on and writes by default
SECONDS = 10.0
N_SAMPLES = int(FS * SECONDS)     # 5000 samples a lead
N_RHYTHM = 3                      # the most rhythm strips a page draws (clinics' II, V1, V5)
N_TRACES = N_LEADS + N_RHYTHM     # trace channels of targets and model: each lead's short strip + the rhythm strips
RHYTHM = N_LEADS                  # the first (top) rhythm strip's trace channel; strip k (top down) is RHYTHM + k

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
    """Rows of leads (left to right, equal columns across the page's 10 s) and the rhythm strips below them.

    A strip's place is where it sits on the page's time axis (seconds from where the traces start, at the
    page's paper speed); its window is which seconds of the signal it shows. Most pages show column j at
    the seconds it sits at; ecg-image-kit's 2-column page restarts every column at t = 0 (restart_columns).
    The page is as wide as 10 s at 25 mm/s: at 50 mm/s it shows the first 5 s.

    A trace channel is a place on the page, named by the lead the standard order draws there: a Cabrera
    page (channel_rows: the standard rows it relabels) draws aVL where the standard page draws I, and so
    on, and draws aVR upside down (inverted, labelled -aVR). Its strips look like the standard page's, so
    a model reads them in the same channels; lead_channels says which channel holds which lead."""
    name: str
    rows: tuple
    rhythm: tuple = ()
    restart_columns: bool = False
    paper_speed_mm_s: float = MM_PER_S
    channel_rows: tuple = None    # the rows whose leads name the channels at each place (None: rows)
    inverted: tuple = ()          # leads drawn upside down
    band_of: str = field(default=None, compare=False)   # a row band: the layout whose rows it crops (row_bands)

    @property
    def n_columns(self):
        return len(self.rows[0])

    @property
    def seconds(self):
        """Seconds of signal across the page's width: 10 at 25 mm/s, 5 at 50 mm/s."""
        return SECONDS * MM_PER_S / self.paper_speed_mm_s

    @property
    def column_seconds(self):
        return self.seconds / self.n_columns

    def column_of(self, lead):
        """Column index of a lead's short strip (None if the rows do not show it)."""
        return next((row.index(lead) for row in self.rows if lead in row), None)

    def short_window(self, lead):
        """(start, end) seconds of the signal a lead's short strip shows, half-open; None if not in the rows."""
        column = self.column_of(lead)
        if column is None:
            return None
        start = 0.0 if self.restart_columns else column * self.column_seconds
        return start, start + self.column_seconds

    def short_place(self, lead):
        """(start, end) seconds on the page's time axis where a lead's short strip is drawn."""
        column = self.column_of(lead)
        return None if column is None else (column * self.column_seconds, (column + 1) * self.column_seconds)

    @property
    def rhythm_leads(self):
        """(N_RHYTHM,) lead index of each rhythm strip, top down (trace channels RHYTHM, RHYTHM + 1, ...), -1
        where the page draws fewer."""
        return [LEADS.index(lead) for lead in self.rhythm] + [-1] * (N_RHYTHM - len(self.rhythm))

    def label(self, lead):
        """The name printed beside a lead's strip: -aVR where it is drawn inverted."""
        return f'-{lead}' if lead in self.inverted else lead

    def sign(self, lead):
        """+1, or -1 for a lead drawn upside down: drawn value = sign * the lead's value."""
        return -1.0 if lead in self.inverted else 1.0

    def drawn_strips(self, fs=FS):
        """{(lead, is_rhythm, first sample s, last sample s)} of every strip the page draws."""
        strips = {(lead, False, *self.short_window(lead)) for row in self.rows for lead in row}
        strips |= {(lead, True, 0.0, self.seconds) for lead in self.rhythm}
        return {(lead, rhythm, t0, t1 - 1 / fs) for lead, rhythm, t0, t1 in strips}

    def lead_channels(self):
        """(12,) int: the trace channel of each lead's short strip (its own index on all but relabelled
        pages) and (12,) float: its sign."""
        channel = np.arange(N_LEADS)
        for row, names in zip(self.rows, self.channel_rows or self.rows):
            for lead, name in zip(row, names):
                channel[LEADS.index(lead)] = LEADS.index(name)
        return channel, np.array([self.sign(lead) for lead in LEADS])

    def strip_seconds(self, fs=FS):
        """(15, 2) windows and (15, 2) places, seconds [first sample, last sample] of each trace channel
        (a place's short strip, then the rhythm strips top down); NaN where the layout draws no such strip."""
        windows = np.full((N_TRACES, 2), np.nan)
        places = np.full((N_TRACES, 2), np.nan)
        by_channel = replace(self, rows=self.channel_rows or self.rows)
        for i, lead in enumerate(LEADS):
            if by_channel.column_of(lead) is not None:
                windows[i] = by_channel.short_window(lead)
                places[i] = by_channel.short_place(lead)
        windows[RHYTHM:RHYTHM + len(self.rhythm)] = places[RHYTHM:RHYTHM + len(self.rhythm)] = (0.0, self.seconds)
        windows[:, 1] -= 1 / fs
        places[:, 1] -= 1 / fs
        return windows, places

    def shown_mask(self, fs=FS, n_samples=N_SAMPLES):
        """(12, n_samples) bool: the samples t = n / fs that the page shows of each lead."""
        t = np.arange(n_samples) / fs
        mask = np.zeros((N_LEADS, n_samples), bool)
        for i, lead in enumerate(LEADS):
            window = self.short_window(lead)
            if window is not None:
                mask[i] |= (t >= window[0] - 1e-9) & (t < window[1] - 1e-9)
            if lead in self.rhythm:
                mask[i] |= t < self.seconds - 1e-9
        return mask

    def at_speed(self, paper_speed_mm_s):
        """The same page drawn at another paper speed (named NAME@50mm/s): same places on the paper, each
        strip showing fewer seconds."""
        return replace(self, name=f'{self.name}@{paper_speed_mm_s:g}mm/s', paper_speed_mm_s=paper_speed_mm_s)

    def cabrera(self):
        """The same page with its limb leads in the Cabrera order (NAME-Cabrera): aVL, I, -aVR, II, aVF,
        III where the standard order draws I, II, III, aVR, aVL, aVF."""
        rows = tuple(tuple(CABRERA_AT.get(lead, lead) for lead in row) for row in self.rows)
        return replace(self, name=f'{self.name}-Cabrera', rows=rows, channel_rows=self.rows, inverted=('aVR',))


# the Cabrera order puts the limb leads in their frontal-plane sequence: what it draws where the standard
# order draws each limb lead (same places on 3x4 and 12x1 pages)
CABRERA_AT = {'I': 'aVL', 'II': 'I', 'III': 'aVR', 'aVR': 'II', 'aVL': 'aVF', 'aVF': 'III'}

THREE_BY_FOUR = (('I', 'aVR', 'V1', 'V4'),
                 ('II', 'aVL', 'V2', 'V5'),
                 ('III', 'aVF', 'V3', 'V6'))
STANDARD = Layout('3x4+II', rows=THREE_BY_FOUR, rhythm=('II',))
# ecg-image-kit --num_columns 2: its own lead order, both columns showing the first 5 s
KIT_SIX_BY_TWO = (('V1', 'V4'), ('I', 'aVR'), ('V2', 'V5'), ('II', 'aVL'), ('V3', 'V6'), ('III', 'aVF'))
LAYOUTS = {layout.name: layout for layout in (
    STANDARD,
    Layout('3x4', rows=THREE_BY_FOUR),
    # any lead as the rhythm strip: ecg-image-kit --full_mode V1 (and --full_mode None, which draws lead I)
    *(Layout(f'3x4+{lead}', rows=THREE_BY_FOUR, rhythm=(lead,)) for lead in LEADS if lead != 'II'),
    Layout('3x4+II+V1+V5', rows=THREE_BY_FOUR, rhythm=('II', 'V1', 'V5')),   # clinics' three rhythm strips
    Layout('6x2+II', rows=KIT_SIX_BY_TWO, rhythm=('II',), restart_columns=True),   # --num_columns 2
    Layout('6x2', rows=KIT_SIX_BY_TWO, restart_columns=True),
    Layout('12x1', rows=tuple((lead,) for lead in LEADS)),
)}
# Cabrera pages (Sweden and much of Europe) of the layouts clinics print them in
LAYOUTS.update({twin.name: twin for twin in (LAYOUTS[name].cabrera() for name in ('3x4+II', '3x4', '12x1'))})
# clinics' 50 mm/s pages: every layout above at twice the paper speed, showing 5 s (12x1@50mm/s draws the
# windows 6x2 draws: page_layout tells them apart by the page's paper speed)
LAYOUTS.update({fast.name: fast for fast in (layout.at_speed(50.0) for layout in list(LAYOUTS.values()))})


# a page of 12 one-column rows is read a second time in three bands of four rows, each cropped from the
# de-rotated page and fed at the full input size: the rows stand farther apart there than on the whole page
# (8 input rows at 128 px, where neighbouring traces cross)
BAND_ROWS = 4


def row_bands(layout):
    """The row bands a layout is read again in (Layouts; none for most layouts): for 12 rows of one column,
    rows 1-4, 5-8 and 9-12, each with the channels and signs of those rows on the whole page."""
    if layout.band_of or layout.rhythm or layout.n_columns != 1 or len(layout.rows) != N_LEADS:
        return ()
    return tuple(replace(layout, name=f'{layout.name} rows {a + 1}-{a + BAND_ROWS}', rows=layout.rows[a:a + BAND_ROWS],
                         channel_rows=layout.channel_rows and layout.channel_rows[a:a + BAND_ROWS], band_of=layout.name)
                 for a in range(0, N_LEADS, BAND_ROWS))


LAYOUTS.update({band.name: band for layout in list(LAYOUTS.values()) for band in row_bands(layout)})


def whole_pages(names):
    """The names that are whole pages, not row bands: what a page's layout is chosen among."""
    return [name for name in names if not LAYOUTS[name].band_of]


def with_cabrera(names):
    """Layout names plus the Cabrera twin of each that has one: a model reads places, not labels, so one
    trained on a layout reads its Cabrera pages too (which is which, the limb leads tell when decoding)."""
    wanted = [replace(LAYOUTS[name].cabrera(), name='') for name in names]
    twins = [twin.name for twin in LAYOUTS.values() if twin.channel_rows and replace(twin, name='') in wanted]
    return list(names) + [name for name in twins if name not in names]


def layout_at_speed(layout, paper_speed_mm_s):
    """The LAYOUTS entry that draws `layout`'s strips at a paper speed (the layout itself at its own)."""
    strips = replace(layout, name='', paper_speed_mm_s=0.0)
    return next(other for other in LAYOUTS.values() if other.paper_speed_mm_s == paper_speed_mm_s
                and replace(other, name='', paper_speed_mm_s=0.0) == strips)


LAYOUT_NAMES_HELP = (', '.join(name for name, layout in LAYOUTS.items()
                               if layout.paper_speed_mm_s == MM_PER_S and not layout.band_of)
                     + ' (each also as NAME@50mm/s)')


def page_layout(strips, paper_speed_mm_s=MM_PER_S, named=None):
    """The LAYOUTS name of a page drawn as strips [(lead, first sample s, last sample s, is_rhythm)] at a
    paper speed, or None when no known layout draws exactly those strips (to within a tenth of a second).
    named: the layout the page's JSON names, if any; it wins where it draws those strips (a 12x1 page and
    its Cabrera twin show every lead over the same 10 s, in another order)."""
    candidates = ([LAYOUTS[named]] if named in LAYOUTS else []) + list(LAYOUTS.values())
    for layout in candidates:
        if layout.paper_speed_mm_s != paper_speed_mm_s:
            continue
        wanted = layout.drawn_strips()
        if len(wanted) == len(strips) and all(
                any(lead == w[0] and rhythm == w[1] and abs(t0 - w[2]) < 0.1 and abs(t1 - w[3]) < 0.1
                    for w in wanted) for lead, t0, t1, rhythm in strips):
            return layout.name
    return None
