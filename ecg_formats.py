"""The formats a digitized ECG goes on to beside its Kaggle CSV, each read back by its own library:

    WFDB   {stem}.hea/.dat  wfdb.rdrecord, PhysioNet's tools
    DICOM  {stem}.dcm       pydicom (ds.waveform_array), DICOM viewers: a 12-lead ECG Waveform object
    EDF+   {stem}.edf       pyedflib, EDFbrowser, MNE (written with edfio)

DICOM and EDF+ are optional extras (requirements-export.txt, ./setup.sh --export); check_formats says which is
missing before a run starts. A Reading carries what every writer needs; write_formats writes those asked for.

Values: all three store 16-bit integers in 1 uV steps, the CSV's 3 decimals (+-32.767 mV, EDF+ +-32.75 mV; beyond
is clipped).
Samples the page does not show (NaN in the CSV):
- WFDB: wfdb's NaN code (-32768), which rdrecord reads back as NaN.
- DICOM: all 12 channels, in the standard order a 12-lead viewer expects; a sample the page does not show
  holds the multiplex group's WaveformPaddingValue (-32768), the standard's mark for "no data here". pydicom's
  waveform_array does not apply it: read the raw values (pydicom.waveforms.multiplex_array(ds, 0, as_raw=True))
  equal to the padding value as NaN.
- EDF+ has no NaN: a lead the page never shows is left out, named in an annotation; a shown lead's spans the
  page does not show hold 0 mV, each with an annotation '<lead> not shown on the page' over the span.
Metadata (the source image, the checkpoint's sha256, the layout, the scale found, per-lead confidence): WFDB
header comments; DICOM waveform annotations (the Waveform Annotation module of the 12-lead ECG IOD, which
viewers show: one free-text item per fact, one per channel with its confidence and shown span); EDF+
annotations at 0 s (the 80-character header fields have no room for a sha256), the image and layout also in
the recording field. Patient and study fields are the user's (Subject) or left empty (DICOM type 2) / 'X'
(EDF+), never guessed.
"""
import argparse
import datetime
import hashlib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

import ecg_cli
from ecg_page import LEADS

UV_PER_MV = 1000                       # every format's digital unit: 1 uV, as PTB-XL stores its records
DIGITAL_MAX = 32767                    # 16-bit signed; -32768 is each format's "no value" (WFDB, DICOM padding)
MAX_MV = DIGITAL_MAX / UV_PER_MV       # values beyond +-32.767 mV are clipped
NO_VALUE = -32768
EXTRAS = './setup.sh --export (or pip install -r requirements-export.txt)'
WRITER_MODULES = {'dicom': 'pydicom', 'edf': 'edfio'}   # the optional extra each flag needs

# DICOM: 12-Lead ECG Waveform Storage; its IOD holds 200-1000 Hz. Lead codes: CID 3001 in SCP-ECG's scheme
TWELVE_LEAD_ECG_STORAGE = '1.2.840.10008.5.1.4.1.1.9.1.1'
DICOM_FS_HZ = (200, 1000)
SCPECG = ('SCPECG', '1.3')             # coding scheme designator, version
LEAD_CODES = {'I': ('5.6.3-9-1', 'Lead I (Einthoven)'), 'II': ('5.6.3-9-2', 'Lead II'),
              'III': ('5.6.3-9-61', 'Lead III'), 'aVR': ('5.6.3-9-62', 'Lead aVR'),
              'aVL': ('5.6.3-9-63', 'Lead aVL'), 'aVF': ('5.6.3-9-64', 'Lead aVF'),
              'V1': ('5.6.3-9-3', 'Lead V1'), 'V2': ('5.6.3-9-4', 'Lead V2'), 'V3': ('5.6.3-9-5', 'Lead V3'),
              'V4': ('5.6.3-9-6', 'Lead V4'), 'V5': ('5.6.3-9-7', 'Lead V5'), 'V6': ('5.6.3-9-8', 'Lead V6')}
MICROVOLT = ('uV', 'UCUM', 'microvolt')
DICOM_TEXT_MAX = 1024                  # ST, what an annotation's UnformattedTextValue holds
DICOM_LO_MAX = 64

# EDF+: 1 uV steps, as the other formats, over +-32.75 mV: the header's 8 characters hold that range exactly
# (edfio rounds +-32.767 outward to -32.7671 / 32.76701, which would make the step 1.00002 uV and shift 0 mV)
EDF_MAX_MV = 32.75
EDF_PHYSICAL_RANGE = (-EDF_MAX_MV, EDF_MAX_MV)
EDF_DIGITAL_RANGE = (-round(EDF_MAX_MV * UV_PER_MV), round(EDF_MAX_MV * UV_PER_MV))
EDF_FIELD_MAX = 80                     # characters in the patient and recording fields
NOT_SHOWN = 'not shown on the page'


@dataclass(frozen=True)
class Subject:
    """Patient and study fields as the user gave them (inference.py --patient_id, ...); None: not given,
    left empty in DICOM and 'X' in EDF+."""
    patient_id: str | None = None
    patient_name: str | None = None
    patient_sex: str | None = None                 # M, F or O
    birth_date: datetime.date | None = None
    study_date: datetime.date | None = None        # the day the ECG was recorded


@dataclass(frozen=True)
class Reading:
    """What travels to the writers: one page's signal (leads x N, mV, NaN where the page does not show a
    lead) at fs Hz and what the reading found (the sidecar JSON's facts)."""
    signal: np.ndarray
    fs: float
    image: str
    checkpoint_sha256: str
    layout: str
    scale: dict
    confidence: dict                               # lead -> 0..1
    subject: Subject = field(default_factory=Subject)
    leads: tuple = tuple(LEADS)

    @classmethod
    def from_report(cls, signal, fs, report, subject=None):
        """A Reading from inference's sidecar report (reading_report) of the page."""
        return cls(signal, fs, report['image'], report.get('checkpoint_sha256') or '', report['layout'],
                   report['scale'], {lead: v['confidence'] for lead, v in report['leads'].items()},
                   subject or Subject())


# ---------------------------------------------------------------- checks and shared pieces

def check_formats(fs, dicom=False, edf=False):
    """Before a run: each asked-for format's extra is installed and can hold fs; an InputError says what
    is missing and how to install it."""
    for flag in [name for name, wanted in (('dicom', dicom), ('edf', edf)) if wanted]:
        module = WRITER_MODULES[flag]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ecg_cli.InputError(f'--{flag} needs {module}, an optional extra not installed here: {EXTRAS}') from None
    if dicom and not DICOM_FS_HZ[0] <= fs <= DICOM_FS_HZ[1]:
        raise ecg_cli.InputError(f'--dicom: a 12-lead ECG waveform object holds {DICOM_FS_HZ[0]}-{DICOM_FS_HZ[1]} Hz; '
                             f'--fs {fs:g} is outside it')


def date_arg(text):
    """argparse type: YYYYMMDD -> datetime.date."""
    try:
        return datetime.datetime.strptime(text, '%Y%m%d').date()
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a YYYYMMDD date') from None


def sha256_file(path):
    """The file's sha256 as 64 hex digits (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def spans(mask):
    """(N,) bool -> [(start, stop)]: the half-open sample ranges where mask is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def not_shown_spans(values):
    """(N,) with NaN gaps -> [(start, stop)] sample ranges where the value is NaN."""
    return spans(np.isnan(values))


def to_microvolts(signal):
    """(leads, N) mV -> int16 in 1 uV steps, clipped to +-32.767 mV; NaN -> NO_VALUE."""
    digital = np.round(np.clip(signal, -MAX_MV, MAX_MV) * UV_PER_MV)
    return np.where(np.isnan(signal), NO_VALUE, digital).astype(np.int16)


def scale_text(scale):
    """The scale the page was read at, in words: 'grid; 10 mm/mV; 25 mm/s' ('assumed' or 'from --gain' where so)."""
    source = scale.get('source') or 'page border'
    gain = f"{scale.get('gain_from_flag') or scale.get('gain_mm_mv')} mm/mV"
    gain += ' from --gain' if scale.get('gain_from_flag') else ' assumed' if scale.get('gain_assumed') else ''
    speed = f"{scale.get('speed_from_flag') or scale.get('paper_speed_mm_s')} mm/s"
    speed += ' from --paper_speed' if scale.get('speed_from_flag') else ' assumed' if scale.get('speed_assumed') else ''
    return f'{source}; {gain}; {speed}'


def metadata_lines(reading):
    """The reading's facts as short lines, each format's text fields hold them."""
    confidence = ' '.join(f'{lead} {reading.confidence[lead]:.3f}' for lead in reading.leads)
    return [f'digitized from {Path(reading.image).name}', f'checkpoint sha256 {reading.checkpoint_sha256}',
            f'layout {reading.layout}', f'scale {scale_text(reading.scale)}', f'confidence {confidence}']


# ---------------------------------------------------------------- WFDB

def write_wfdb(reading, csv_path):
    """{stem}.hea/.dat beside the CSV (fmt 16, 1000 units/mV, baseline 0), metadata_lines as header comments.
    Not-shown samples are written as wfdb's NaN code (-32768), which wfdb.rdrecord reads back as NaN.
    Returns the .hea path."""
    record = re.sub(r'[^-\w]', '_', csv_path.stem)   # wfdb accepts letters, digits, '-' and '_' only
    p_signal = np.clip(reading.signal.T, -MAX_MV, MAX_MV)
    n = len(reading.leads)
    wfdb.wrsamp(record, fs=reading.fs, units=['mV'] * n, sig_name=list(reading.leads), p_signal=p_signal,
                fmt=['16'] * n, adc_gain=[float(UV_PER_MV)] * n, baseline=[0] * n,
                comments=metadata_lines(reading), write_dir=str(csv_path.parent))
    return csv_path.parent / f'{record}.hea'


# ---------------------------------------------------------------- DICOM

def coded(code, designator, meaning, version=None):
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning, CodingSchemeVersion)."""
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, designator, meaning
    if version:
        item.CodingSchemeVersion = version
    return item


def channel_definition(lead):
    """One channel: the lead's CID 3001 code, 1 uV per unit, baseline 0, 16 bits."""
    from pydicom.dataset import Dataset
    channel = Dataset()
    channel.ChannelLabel = lead
    channel.ChannelSourceSequence = [coded(LEAD_CODES[lead][0], SCPECG[0], LEAD_CODES[lead][1], SCPECG[1])]
    channel.ChannelSensitivity = '1'
    channel.ChannelSensitivityUnitsSequence = [coded(*MICROVOLT)]
    channel.ChannelSensitivityCorrectionFactor = '1'
    channel.ChannelBaseline = '0'
    channel.ChannelSampleSkew = '0'
    channel.WaveformBitsStored = 16
    return channel


def waveform_group(reading):
    """The one multiplex group: every lead at fs, samples interleaved (S1: C1..C12, S2: ...), padding
    NO_VALUE where the page does not show the lead."""
    from pydicom.dataset import Dataset
    group = Dataset()
    group.MultiplexGroupTimeOffset = '0'
    group.WaveformOriginality = 'DERIVED'          # read from a paper page, not the recorder's own samples
    group.NumberOfWaveformChannels = len(reading.leads)
    group.NumberOfWaveformSamples = reading.signal.shape[1]
    group.SamplingFrequency = f'{reading.fs:g}'
    group.MultiplexGroupLabel = 'digitized page'  # SH: 16 characters
    group.ChannelDefinitionSequence = [channel_definition(lead) for lead in reading.leads]
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = 'SS'
    group.add_new('WaveformPaddingValue', 'OW', np.int16(NO_VALUE).tobytes())
    group.add_new('WaveformData', 'OW', to_microvolts(reading.signal).T.astype('<i2').tobytes())
    return group


def channel_note(reading, i):
    """The text of lead i's annotation: its confidence and the seconds the page shows it."""
    runs = spans(np.isfinite(reading.signal[i]))
    shown = [f'{start / reading.fs:.2f}-{stop / reading.fs:.2f} s' for start, stop in runs]
    where = f'shown {", ".join(shown)}' if shown else NOT_SHOWN
    return f'{reading.leads[i]}: confidence {reading.confidence[reading.leads[i]]:.3f}; {where}'


def annotations(reading):
    """Waveform annotations: metadata_lines (no channel), then one per channel (its confidence and span)."""
    from pydicom.dataset import Dataset
    items = []
    for text in metadata_lines(reading):
        item = Dataset()
        item.UnformattedTextValue = text[:DICOM_TEXT_MAX]
        items.append(item)
    for i in range(len(reading.leads)):
        item = Dataset()
        item.UnformattedTextValue = channel_note(reading, i)
        item.ReferencedWaveformChannels = [1, i + 1]   # (multiplex group, channel), both from 1
        items.append(item)
    return items


def set_subject(ds, subject):
    """Patient and study fields (type 2: present, empty unless the user gave them)."""
    ds.PatientName = subject.patient_name or ''
    ds.PatientID = subject.patient_id or ''
    ds.PatientBirthDate = subject.birth_date.strftime('%Y%m%d') if subject.birth_date else ''
    ds.PatientSex = subject.patient_sex or ''
    ds.StudyDate = subject.study_date.strftime('%Y%m%d') if subject.study_date else ''
    for keyword in ('StudyTime', 'ReferringPhysicianName', 'StudyID', 'AccessionNumber', 'SeriesNumber',
                    'Manufacturer', 'AcquisitionContextSequence'):
        setattr(ds, keyword, [] if keyword.endswith('Sequence') else '')


def dicom_dataset(reading, now):
    """The 12-lead ECG waveform object (without its file meta). AcquisitionDateTime, which the IOD needs,
    is --study_date when given, else the time of digitizing (the paper's own recording time is not read)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    ds = Dataset()
    ds.SpecificCharacterSet = 'ISO_IR 192'         # UTF-8: names as the user typed them
    ds.SOPClassUID, ds.SOPInstanceUID = TWELVE_LEAD_ECG_STORAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.InstanceNumber = 'ECG', 1
    ds.InstanceCreationDate = ds.ContentDate = now.strftime('%Y%m%d')
    ds.InstanceCreationTime = ds.ContentTime = now.strftime('%H%M%S')
    study = reading.subject.study_date
    ds.AcquisitionDateTime = study.strftime('%Y%m%d') if study else now.strftime('%Y%m%d%H%M%S')
    ds.SeriesDescription = metadata_lines(reading)[0][:DICOM_LO_MAX]
    set_subject(ds, reading.subject)
    ds.WaveformSequence = [waveform_group(reading)]
    ds.WaveformAnnotationSequence = annotations(reading)
    return ds


def write_dicom(reading, path, now=None):
    """The Reading as a DICOM 12-lead ECG Waveform file (explicit VR little endian) at path."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    ds = dicom_dataset(reading, now or datetime.datetime.now())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- EDF+

def edf_text(text):
    """A header subfield: ASCII without spaces (EDF+), '_' for each other character."""
    return re.sub(r'[^!-~]', '_', text)


def edf_signals(reading):
    """One EdfSignal per lead the page shows (label 'ECG <lead>', mV, 1 uV steps), 0 mV where it does not."""
    from edfio import EdfSignal
    signals = []
    for lead, values in zip(reading.leads, reading.signal):
        if np.isnan(values).all():
            continue
        data = np.clip(np.nan_to_num(values, nan=0.0), -EDF_MAX_MV, EDF_MAX_MV)
        signals.append(EdfSignal(data, reading.fs, label=f'ECG {lead}',
                                 physical_dimension='mV', physical_range=EDF_PHYSICAL_RANGE,
                                 digital_range=EDF_DIGITAL_RANGE))
    return signals


def edf_annotations(reading):
    """metadata_lines at 0 s, then '<lead> not shown on the page' over each span a lead is not shown (a
    lead never shown: over the whole record, and it is left out)."""
    from edfio import EdfAnnotation
    notes = [EdfAnnotation(0, None, text) for text in metadata_lines(reading)]
    for lead, values in zip(reading.leads, reading.signal):
        left_out = ' (left out)' if np.isnan(values).all() else ''
        for start, stop in not_shown_spans(values):
            text = f'{lead} {NOT_SHOWN}{left_out}'
            notes.append(EdfAnnotation(start / reading.fs, (stop - start) / reading.fs, text))
    return notes


def edf_header(reading):
    """(Patient, Recording): the user's fields or 'X'; the recording field also names the image and layout
    as its room allows."""
    from edfio import Patient, Recording
    subject = reading.subject
    sex = subject.patient_sex if subject.patient_sex in ('M', 'F') else 'X'
    patient = Patient(code=edf_text(subject.patient_id or 'X'), sex=sex, birthdate=subject.birth_date,
                      name=edf_text(subject.patient_name or 'X'))
    fixed = len(f'Startdate {subject.study_date and "01-JAN-2000" or "X"} X X X ')
    extra = edf_text(f'{Path(reading.image).name}_{reading.layout}')[:EDF_FIELD_MAX - fixed]
    return patient, Recording(startdate=subject.study_date, additional=[extra] if extra else [])


def write_edf(reading, path):
    """The Reading as an EDF+ file at path (edfio)."""
    from edfio import Edf
    patient, recording = edf_header(reading)
    Edf(edf_signals(reading), patient=patient, recording=recording,
        annotations=edf_annotations(reading)).write(path)
    return path


# ---------------------------------------------------------------- all of them

def write_formats(reading, csv_path, formats):
    """The formats named (wfdb, dicom, edf) beside the CSV: {stem}.hea/.dat, .dcm, .edf; returns the paths
    written."""
    written = []
    if 'wfdb' in formats:
        hea = write_wfdb(reading, csv_path)
        written += [hea, hea.with_suffix('.dat')]
    if 'dicom' in formats:
        written.append(write_dicom(reading, csv_path.with_suffix('.dcm')))
    if 'edf' in formats:
        written.append(write_edf(reading, csv_path.with_suffix('.edf')))
    return written
