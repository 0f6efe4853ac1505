"""The generic default corpus, for expert folders that bring no calibration or evaluation text.

An expert.yaml may say ``calibration: default`` and/or ``evaluation: default`` instead of naming a file
in the folder. The texts are English technical prose: chunks of the docstrings of Python's standard
library (PSF licence; built with Python 3.11 on 2026-12-03), 160 for calibration and 120 other ones for
evaluation. They are generic: salience statistics and quality figures measured on them say less about an
expert's own domain than its own data would, and the pipeline logs a warning when they are used.

Every text set, these and the experts' own, is read by one module: :mod:`meswitch.data.loading`.
"""

from pathlib import Path

DEFAULT = "default"
DEFAULT_CALIBRATION = Path(__file__).with_name("default_calib.jsonl")
DEFAULT_EVALUATION = Path(__file__).with_name("default_eval.jsonl")
