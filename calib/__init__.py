"""Calibrated compression: CSKV low-rank bi-branch KV cache (cskv.py) and LLM-MQ mixed-precision
weights (mq.py, quantizers in quantize.py), written to one checkpoint (checkpoint.py) and applied to a
loaded model (apply.py). The calibration text (`shrinkrt.evaluate.corpus.CALIB_FILES`) is disjoint
from the evaluation text by construction; the CLI passes its tokens in.
"""
