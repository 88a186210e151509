#!/bin/bash
# One device call: a decoder-only VAE fine-tune beside several transformer variants (the tiny models leave the
# H100 mostly idle, so they share it), then the acceptance of each variant with the new decoder.
# Usage (after the set-up lines of benchmarks/PENDING_GPU_RUNS.md):
#   bash benchmarks/reference_training/parallel_runs.sh SECONDS "name:extra args" ["name:extra args" ...]
# Each variant starts from $INIT_<name> if set, else $INIT, else assets/reference ("none": from scratch).
# SKIP_VAE=1 trains no decoder; VAE_EXTRA: more arguments for the decoder run (e.g. "--vae-crop-mode object
# --vae-object-weight 3"). ACCEPTANCE_EXTRA: arguments for every acceptance (e.g. --clip-size 17,128,128);
# FULL_ACCEPTANCE=1 adds a default-size acceptance (log/acceptance_full.json).
# Results: $OUT/logs.tar, $OUT/<name>_transformer.tar per variant, $OUT/vae.tar (each under the 16 MiB limit).
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
    --log-dir /tmp/runs/vae/log --checkpoint-dir /tmp/runs/vae/ckpt ${VAE_EXTRA:-} > /tmp/runs/vae/train.log 2>&1 &
fi
# A pool cache is keyed by clip size and batch: every variant sharing POOL_CACHE must pass the same
# --clip-size and --transformer-batch as the first one, or it refuses the pool and does not train.
if [ -n "${POOL_CACHE:-}" ]; then  # encode the pool once, with the first variant's clip size and batch
  first=${1#*:}; mkdir -p /tmp/runs/pool && rm -rf /tmp/runs/pool/assets && cp -r "$init" /tmp/runs/pool/assets
  # shellcheck disable=SC2086
  python3 $train --stage transformer --transformer-steps 0 --pool-cache "$POOL_CACHE" --assets-dir /tmp/runs/pool/assets \
    --log-dir /tmp/runs/pool/log --checkpoint-dir /tmp/runs/pool/ckpt $first > /tmp/runs/pool/train.log 2>&1
  grep pool /tmp/runs/pool/train.log
fi
names=()
for spec in "$@"; do
  name=${spec%%:*}; extra=${spec#*:}; names+=("$name")
  start_var="INIT_$name"; start=${!start_var:-$init}
  from=(--init-from "$start"); [ "$start" = none ] && from=() && start=$init
  dir=/tmp/runs/$name; mkdir -p "$dir" && rm -rf "$dir/assets" && cp -r "$start" "$dir/assets"
  # shellcheck disable=SC2086
  python3 $train --stage transformer "${from[@]}" --transformer-seconds "$seconds" \
    --transformer-steps 1000000 --deadline-seconds $((seconds + 10)) --log-every 100 --checkpoint-every 0 \
    --assets-dir "$dir/assets" --log-dir "$dir/log" --checkpoint-dir "$dir/ckpt" \
    ${POOL_CACHE:+--pool-cache "$POOL_CACHE"} $extra > "$dir/train.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  dir=/tmp/runs/$name
  tail -n 2 "$dir/train.log"
  if [ -z "${SKIP_VAE:-}" ] && [ -d /tmp/runs/vae/assets/vae ]; then
    rm -rf "$dir/assets/vae" && cp -r /tmp/runs/vae/assets/vae "$dir/assets/vae"
  fi
  # shellcheck disable=SC2086
  ( python3 $train --stage acceptance --assets-dir "$dir/assets" --log-dir "$dir/log" \
      --acceptance-out "$dir/log/acceptance.json" --samples-out "$dir/log/samples.png" \
      --acceptance-seconds "${ACCEPTANCE_SECONDS:-60}" ${ACCEPTANCE_EXTRA:-} > "$dir/acceptance.log" 2>&1
    if [ -n "${FULL_ACCEPTANCE:-}" ]; then
      python3 $train --stage acceptance --assets-dir "$dir/assets" --log-dir "$dir/log" \
        --acceptance-out "$dir/log/acceptance_full.json" --samples-out "$dir/log/samples_full.png" \
        --acceptance-seconds "${ACCEPTANCE_SECONDS:-60}" > "$dir/acceptance_full.log" 2>&1
    fi ) &
done
wait
for name in "${names[@]}"; do
  echo "== $name"
  for f in /tmp/runs/$name/acceptance.log /tmp/runs/$name/acceptance_full.log; do
    [ -f "$f" ] && echo "$f" && grep -E "colour_match_rate|videos_generated|mean_mass_within|classifier_on" "$f"
  done
  cp /tmp/runs/$name/*.log /tmp/runs/$name/log/ 2>/dev/null
  tar -C /tmp/runs/$name/assets -cf "$OUT/${name}_transformer.tar" transformer model_card.json
done
if [ -z "${SKIP_VAE:-}" ]; then
  tail -n 3 /tmp/runs/vae/train.log; cp /tmp/runs/vae/train.log /tmp/runs/vae/log/
  [ -d /tmp/runs/vae/assets/vae ] && tar -C /tmp/runs/vae/assets -cf "$OUT/vae.tar" vae
fi
tar -C /tmp/runs -cf "$OUT/logs.tar" $(cd /tmp/runs && ls -d */log)
ls -la "$OUT"
