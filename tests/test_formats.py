"""inference.py --dicom --edf --wfdb (ecg_formats.py): one real CLI run on an ecg-image-kit fixture page with the
starter weights, each file read back by its own library (pydicom's waveform_array, pyedflib, wfdb.rdrecord) to
the CSV's values within its 1 uV step, NaN where the format allows it and as documented where not, and the
metadata in it. The round trips skip without the optional extras; the missing-extra error is tested without."""
import datetime
import hashlib
import importlib
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import wfdb

import ecg_checkpoint
import ecg_formats
from conftest import FIXTURE, run_cli, run_in_process
from ecg_page import LEADS

EXTRAS = 'optional extras not installed: pip install -r requirements-export.txt (or ./setup.sh --export)'
UV = 1e-3 + 1e-9          # mV: each format's step (the CSV's 3 decimals round the same values)
SUBJECT = ['--patient_id', 'P-7', '--patient_name', 'Doe^Jane', '--patient_sex', 'F', '--study_date', '20240131']
SHA256 = hashlib.sha256(ecg_checkpoint.STARTER.read_bytes()).hexdigest()


def extra(module):
    return pytest.importorskip(module, reason=EXTRAS, exc_type=ImportError)


def installed(module):
    try:
        return importlib.import_module(module) is not None
    except ImportError:
        return False


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """The fixture page digitized once with --dicom --edf --wfdb (--wfdb alone without the extras) and the
    patient fields: (CSV path, its values (N, 12))."""
    folder = tmp_path_factory.mktemp('formats')
    image = shutil.copy(FIXTURE / 'images' / 'fx1024-0001.png', folder / 'page.png')
    csv = folder / 'out' / 'page.csv'
    extras = ['--dicom', '--edf'] if installed('pydicom') and installed('edfio') else []
    run_cli('inference.py', '--image', image, '--checkpoint', ecg_checkpoint.STARTER, '--output', csv,
            *extras, '--wfdb', '--threads', 1, *SUBJECT)
    return csv, pd.read_csv(csv).to_numpy()


def synthetic_reading(subject=ecg_formats.Subject()):
    """A 1 s, 500 Hz Reading whose V3 the page never shows and whose aVR it shows from 0.5 s only."""
    signal = np.tile(np.linspace(-1.5, 1.5, 500), (12, 1))
    signal[LEADS.index('V3')] = np.nan
    signal[LEADS.index('aVR'), :250] = np.nan
    return ecg_formats.Reading(signal, 500.0, 'scans/a page.png', 'ab' * 32, '3x4+II',
                               {'source': 'grid', 'gain_mm_mv': 10.0, 'paper_speed_mm_s': 25.0},
                               {lead: 0.5 for lead in LEADS}, subject)


def dicom_values(ds):
    """pydicom's waveform_array in mV, NaN where the raw value is the group's padding value."""
    from pydicom.waveforms import multiplex_array
    padding = np.frombuffer(ds.WaveformSequence[0].WaveformPaddingValue, '<i2')[0]
    raw = multiplex_array(ds, 0, as_raw=True)
    return np.where(raw == padding, np.nan, ds.waveform_array(0) / 1000)


def test_dicom_reads_back_with_pydicom_to_the_csv(written):
    pydicom = extra('pydicom')
    csv, values = written
    ds = pydicom.dcmread(csv.with_suffix('.dcm'))
    assert ds.SOPClassUID == ecg_formats.TWELVE_LEAD_ECG_STORAGE and ds.Modality == 'ECG'
    group = ds.WaveformSequence[0]
    assert float(group.SamplingFrequency) == 500 and group.WaveformSampleInterpretation == 'SS'
    read = dicom_values(ds)
    assert read.shape == values.shape == (5000, 12)
    assert (np.isnan(read) == np.isnan(values)).all()               # not shown: the padding value
    np.testing.assert_allclose(read, values, atol=UV, rtol=0, equal_nan=True)
    assert np.isfinite(values).sum() > 12 * 1250                     # II shown for 10 s, the rest 2.5 s


def test_dicom_channels_carry_the_standard_lead_codes_in_microvolts(written):
    pydicom = extra('pydicom')
    ds = pydicom.dcmread(written[0].with_suffix('.dcm'))
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    sources = [c.ChannelSourceSequence[0] for c in channels]
    codes = [(source.CodeValue, source.CodingSchemeDesignator) for source in sources]
    assert codes == [('5.6.3-9-1', 'SCPECG'), ('5.6.3-9-2', 'SCPECG'), ('5.6.3-9-61', 'SCPECG'),
                     ('5.6.3-9-62', 'SCPECG'), ('5.6.3-9-63', 'SCPECG'), ('5.6.3-9-64', 'SCPECG'),
                     *[(f'5.6.3-9-{k}', 'SCPECG') for k in range(3, 9)]]
    assert [source.CodeMeaning for source in sources][1:3] == ['Lead II', 'Lead III']
    units = channels[0].ChannelSensitivityUnitsSequence[0]
    assert (units.CodeValue, units.CodingSchemeDesignator) == ('uV', 'UCUM')
    assert all(float(c.ChannelSensitivity) == 1 for c in channels)


def test_dicom_holds_the_metadata_and_only_the_given_patient_fields(written):
    pydicom = extra('pydicom')
    ds = pydicom.dcmread(written[0].with_suffix('.dcm'))
    notes = [item.UnformattedTextValue for item in ds.WaveformAnnotationSequence]
    assert f'checkpoint sha256 {SHA256}' in notes and 'layout 3x4+II' in notes
    assert 'digitized from page.png' in notes and any(n.startswith('scale grid') for n in notes)
    per_lead = {tuple(item.ReferencedWaveformChannels): item.UnformattedTextValue
                for item in ds.WaveformAnnotationSequence if 'ReferencedWaveformChannels' in item}
    assert per_lead[(1, 2)].startswith('II: confidence') and per_lead[(1, 2)].endswith('shown 0.00-10.00 s')
    assert per_lead[(1, 12)].endswith('shown 7.50-10.00 s')
    assert (ds.PatientID, str(ds.PatientName), ds.PatientSex, ds.StudyDate) == ('P-7', 'Doe^Jane', 'F', '20240131')
    assert ds.PatientBirthDate == '' and ds.ReferringPhysicianName == ''   # not given: empty, not guessed


def test_edf_reads_back_with_pyedflib_to_the_shown_samples(written):
    pyedflib = extra('pyedflib')
    csv, values = written
    with pyedflib.EdfReader(str(csv.with_suffix('.edf'))) as edf:
        assert edf.getSignalLabels() == [f'ECG {lead}' for lead in LEADS]   # the standard page shows every lead
        assert {edf.getPhysicalDimension(i) for i in range(12)} == {'mV'}
        assert {edf.getSampleFrequency(i) for i in range(12)} == {500}
        read = np.stack([edf.readSignal(i) for i in range(12)], axis=1)
        onsets, durations, texts = edf.readAnnotations()
        assert (edf.getPatientCode(), edf.getPatientName(), edf.getSex()) == ('P-7', 'Doe^Jane', 'Female')
        assert edf.getStartdatetime().date() == datetime.date(2024, 1, 31)
        assert 'page.png_3x4+II' in edf.getRecordingAdditional()
    shown = np.isfinite(values)
    np.testing.assert_allclose(read[shown], values[shown], atol=UV, rtol=0)
    assert (read[~shown] == 0).all()                                      # documented: 0 mV, annotated
    gaps = sorted((round(o, 6), round(d, 6), t) for o, d, t in zip(onsets, durations, texts) if 'not shown' in t)
    expected = sorted((start / 500, (stop - start) / 500, f'{lead} not shown on the page')
                      for lead, column in zip(LEADS, values.T) for start, stop in ecg_formats.not_shown_spans(column))
    assert gaps == expected and len(gaps) == 17     # I, III, V4-V6: one gap each; aVR-aVF, V1-V3: two; II none
    assert f'checkpoint sha256 {SHA256}' in texts and 'layout 3x4+II' in texts


def test_wfdb_reads_back_with_rdrecord_and_its_header_comments(written):
    csv, values = written
    record = wfdb.rdrecord(str(csv.with_suffix('')))
    assert record.sig_name == LEADS and record.fs == 500 and record.units == ['mV'] * 12
    assert (np.isnan(record.p_signal) == np.isnan(values)).all()
    np.testing.assert_allclose(record.p_signal, values, atol=UV, rtol=0, equal_nan=True)
    assert f'checkpoint sha256 {SHA256}' in record.comments and 'layout 3x4+II' in record.comments


def test_the_sidecar_names_the_checkpoint_by_its_sha256(written):
    report = json.loads(written[0].with_suffix('.json').read_text())
    assert report['checkpoint_sha256'] == SHA256


def test_a_lead_never_shown_is_padded_in_dicom_and_left_out_of_edf(tmp_path):
    pydicom, pyedflib = extra('pydicom'), extra('pyedflib')
    extra('edfio')
    reading = synthetic_reading()
    ecg_formats.write_formats(reading, tmp_path / 'a.csv', ['dicom', 'edf'])
    read = dicom_values(pydicom.dcmread(tmp_path / 'a.dcm'))
    assert read.shape == (500, 12) and np.isnan(read[:, LEADS.index('V3')]).all()
    np.testing.assert_allclose(read, reading.signal.T, atol=UV, rtol=0, equal_nan=True)
    with pyedflib.EdfReader(str(tmp_path / 'a.edf')) as edf:
        assert 'ECG V3' not in edf.getSignalLabels() and len(edf.getSignalLabels()) == 11
        _, _, texts = edf.readAnnotations()
    assert 'V3 not shown on the page (left out)' in texts and 'aVR not shown on the page' in texts
    header = (tmp_path / 'a.edf').read_bytes()[:256]
    assert header[8:88].strip() == b'X X X X'                            # patient: not given
    assert header[88:168].startswith(b'Startdate X X X X a_page.png_3x4+II')


def test_dicom_patient_and_study_fields_stay_empty_unless_given():
    extra('pydicom')
    ds = ecg_formats.dicom_dataset(synthetic_reading(), datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert [ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex, ds.StudyDate] == [''] * 5
    assert ds.AcquisitionDateTime == '20260102030405'       # the IOD needs one: the time of digitizing


@pytest.mark.parametrize('flag, module', [('--dicom', 'pydicom'), ('--edf', 'edfio')])
def test_a_missing_extra_is_one_error_line_before_the_model(flag, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)          # import fails as if it were not installed
    result = run_in_process('inference.py', '--image', tmp_path / 'page.png', '--checkpoint', tmp_path / 'none.pth',
                            '--output', tmp_path / 'o.csv', flag)
    assert result.returncode == 1
    assert result.stderr.strip() == (f'error: {flag} needs {module}, an optional extra not installed here: '
                                     './setup.sh --export (or pip install -r requirements-export.txt)')


def test_dicom_refuses_a_rate_its_object_cannot_hold(tmp_path):
    extra('pydicom')
    result = run_in_process('inference.py', '--image', tmp_path / 'page.png', '--output', tmp_path / 'o.csv',
                            '--dicom', '--fs', '100')
    assert result.returncode == 1 and '200-1000 Hz' in result.stderr and '--fs 100' in result.stderr
