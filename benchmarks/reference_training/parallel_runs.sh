#!/bin/bash
# One device call: a decoder-only VAE fine-tune beside several transformer variants (the tiny models leave the
# H100 mostly idle, so they share it), then the acceptance of each variant with the new decoder.
# Usage (after the set-up lines of benchmarks/PENDING_GPU_RUNS.md):
#   bash benchmarks/reference_training/parallel_runs.sh SECONDS "name:extra args" ["name:extra args" ...]
# Weights start from assets/reference (or $INIT if set). Results: $OUT/logs.tar, $OUT/weights.tar.
set -u
: "${OUT:?}"
seconds=$1; shift
init=${INIT:-assets/reference}
train="benchmarks/train_reference.py ${COMMON:-}"  # COMMON: e.g. "--config smoke --device cpu" for a local try
mkdir -p /tmp/runs
if [ -z "${SKIP_VAE:-}" ]; then
  mkdir -p /tmp/runs/vae && rm -rf /tmp/runs/vae/assets && cp -r "$init" /tmp/runs/vae/assets
  python3 $train --stage vae --init-from "$init" --vae-train decoder --vae-seconds "${VAE_SECONDS:-190}" \
    --vae-steps 100000 --vae-lr 3e-4 --log-every 50 --checkpoint-every 0 --assets-dir /tmp/runs/vae/assets \
    --log-dir /tmp/runs/vae/log --checkpoint-dir /tmp/runs/vae/ckpt > /tmp/runs/vae/train.log 2>&1 &
fi
names=()
for spec in "$@"; do
  name=${spec%%:*}; extra=${spec#*:}; names+=("$name")
  dir=/tmp/runs/$name; mkdir -p "$dir" && rm -rf "$dir/assets" && cp -r "$init" "$dir/assets"
  # shellcheck disable=SC2086
  python3 $train --stage transformer --init-from "$init" --transformer-seconds "$seconds" \
    --transformer-steps 1000000 --deadline-seconds $((seconds + 10)) --log-every 100 --checkpoint-every 0 \
    --assets-dir "$dir/assets" --log-dir "$dir/log" --checkpoint-dir "$dir/ckpt" $extra > "$dir/train.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  dir=/tmp/runs/$name
  tail -n 2 "$dir/train.log"
  [ -d /tmp/runs/vae/assets/vae ] && [ -z "${SKIP_VAE:-}" ] && rm -rf "$dir/assets/vae" && cp -r /tmp/runs/vae/assets/vae "$dir/assets/vae"
  python3 $train --stage acceptance --assets-dir "$dir/assets" --log-dir "$dir/log" \
    --acceptance-out "$dir/log/acceptance.json" --samples-out "$dir/log/samples.png" \
    --acceptance-seconds "${ACCEPTANCE_SECONDS:-60}" > "$dir/acceptance.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  echo "== $name"; grep -E "colour_match_rate|videos_generated|mean_mass_within|classifier_on" /tmp/runs/$name/acceptance.log
  cp /tmp/runs/$name/train.log /tmp/runs/$name/acceptance.log /tmp/runs/$name/log/ 2>/dev/null
done
[ -z "${SKIP_VAE:-}" ] && tail -n 3 /tmp/runs/vae/train.log && cp /tmp/runs/vae/train.log /tmp/runs/vae/log/
tar -C /tmp/runs -cf "$OUT/logs.tar" $(cd /tmp/runs && ls -d */log)
tar -C /tmp/runs -cf "$OUT/weights.tar" $(cd /tmp/runs && for n in "${names[@]}"; do echo "$n/assets/transformer $n/assets/model_card.json"; done) \
  $( [ -d /tmp/runs/vae/assets/vae ] && [ -z "${SKIP_VAE:-}" ] && echo vae/assets/vae )
ls -la "$OUT"
