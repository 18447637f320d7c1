"""Calibrated compression (CSKV low-rank KV cache, LLM-MQ mixed-precision weights).

Not built yet: see the open issues. The evaluation text split that calibration must use lives in
`shrinkrt.evaluate.corpus` (CALIB_FILES), disjoint from the evaluation text by construction.
"""
