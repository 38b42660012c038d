#!/usr/bin/env bash
# Create .venv in the project (once) and install the pinned requirements into it.
# Re-running is cheap: pip runs only when requirements.txt changed. Used by train.sh, .ci/run and the README.
# ./setup.sh --export also installs requirements-export.txt (onnx, onnxruntime, pydicom, edfio, pyedflib) for
# export_onnx.py, inference.py --onnx, --dicom and --edf.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# pip and the import check run when requirements.txt changed since they last passed (its sha256 in .venv):
# re-running costs a second, not pip's 12 s of resolving what is there (train.sh runs this every time)
STAMP=.venv/requirements.sha256
WANTED=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
    # this machine's pip config names local wheel folders that may be absent: drop those warnings only
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
            2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); then
        echo "[setup] pip could not install requirements.txt into .venv" >&2
        exit 1
    fi
    .venv/bin/python -c "import torch, segmentation_models_pytorch, albumentations, cv2, pypdfium2; print('[setup] ready: torch', torch.__version__)"
    echo "$WANTED" > "$STAMP"
else
    echo "[setup] ready: .venv has requirements.txt ($STAMP; delete it to check again)"
fi
if [ "${1:-}" = --export ]; then   # optional: ONNX export, onnxruntime inference, DICOM and EDF+ output
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-export.txt \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    .venv/bin/python -c "import onnx, onnxruntime, pydicom, edfio, pyedflib; print('[setup] export extras: onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'pydicom', pydicom.__version__, 'edfio', edfio.__version__, 'pyedflib', pyedflib.__version__)"
fi
