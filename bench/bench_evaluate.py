"""P7: bootstrap CIs at NIH test-set scale: 22,423 test images × 1,000 resamples × 14 findings.

Real NIH metadata (labels, patients and their image counts); scores share a per-patient effect, as a
model's scores do for images of one patient. Times patient (cluster) and image resampling and prints the
mean per-finding 95% CI width of each.
"""

from __future__ import annotations

import time

import numpy as np
from common import NIH

from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import bootstrap_aurocs

RESAMPLES = 1000


def main() -> None:
    table, labels = read_metadata(NIH / "Data_Entry_2017_v2020.csv.gz")
    patients = table["patient_id"].to_numpy()
    rng = np.random.default_rng(0)
    effect = rng.normal(0, 1, patients.max() + 1)[patients][:, None]
    scores = 1 / (1 + np.exp(-(labels + effect + rng.normal(0, 0.5, labels.shape))))
    test = patient_split(patients, labels, seed=0).test
    y, p = labels[test].astype(float), scores[test].astype(np.float32).astype(float)  # float32, as served
    bootstrap_aurocs(y[:2000], p[:2000], 50, 0)  # first-call costs stay out of the figures
    print(f"{len(test):,} test images, {len(np.unique(patients[test])):,} patients, {RESAMPLES:,} resamples")
    for unit, ids in (("patients", patients[test]), ("images", None)):
        begin = time.perf_counter()
        boots = bootstrap_aurocs(y, p, RESAMPLES, 0, ids)
        seconds = time.perf_counter() - begin
        low, high = np.nanpercentile(boots, [2.5, 97.5], axis=0)
        print(f"{unit:>8}: {seconds:5.2f} s, mean per-finding 95% CI width {np.mean(high - low):.4f}")


if __name__ == "__main__":
    main()
