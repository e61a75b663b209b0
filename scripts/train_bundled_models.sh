#!/usr/bin/env bash
# Rebuild one bundled network end to end; every stage resumes where it stopped.
#
#   bash scripts/train_bundled_models.sh SIGMA WORKDIR INIT_WEIGHTS STEM [TRAIN_MINUTES]
#
#   SIGMA         velocity dispersion of the training spectra (150 or 300 km/s)
#   WORKDIR       folder for the training set and the run (never committed)
#   INIT_WEIGHTS  weights to fine-tune from (the previous bundled network)
#   STEM          where to export the calibrated model, e.g. cubesfh/network/data/sfhnet
#
# The bundled models of 0.4 (validity channel, training gaps, model systematics) were made
# with, side by side on a 2-core CPU (one thread each),
#   bash scripts/train_bundled_models.sh 150 work150 <0.3 sfhnet.pt> cubesfh/network/data/sfhnet 62
#   bash scripts/train_bundled_models.sh 300 work300 <0.3 sfhnet_s300.pt> cubesfh/network/data/sfhnet_s300 62
# (the 0.3 weights have one input channel; training widens the first convolution with zero
# weights on the validity channel). Those of 0.3 were made the same way from the 0.2 ones.
set -euo pipefail
SIGMA=$1
WORK=$2
INIT=$3
STEM=$4
MINUTES=${5:-55}
THREADS=${THREADS:-1}
mkdir -p "$WORK"
TS="$WORK/ts_broad_s${SIGMA}.h5"
RUN="$WORK/run_s${SIGMA}"
# 1. training set: broad simulator, all training libraries, seed 42
cubesfh make-training-set --n 165000 --seed 42 --sigma-target "$SIGMA" --prior broad \
    -o "$TS" --no-progress
# 2. point network, fine-tuned from the previous bundled weights
if [ ! -f "$RUN/init_weights.pt" ]; then mkdir -p "$RUN" && cp "$INIT" "$RUN/init_weights.pt"; fi
cubesfh train "$TS" -o "$RUN" --seed 42 --lr 5e-4 --init-weights "$RUN/init_weights.pt" \
    --threads "$THREADS" --time-limit "$MINUTES" --no-progress
# 3. uncertainty and OOD heads, split-conformal calibration, export
cubesfh calibrate "$RUN" "$TS" --seed 42 --threads "$THREADS" --export "$STEM" --no-progress
