#!/usr/bin/env bash
# The main job: answer a spoken question with text and speech, transcribe a clip, speak a sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
out=${OUT_DIR:-out/demo}
mkdir -p "$out"
model_args=()
if [[ ! -f src/lfm2_audio/assets/demo-model/config.json ]]; then
  echo "demo: the bundled demo model is not built yet; using a tiny random-weight checkpoint (output is noise)" >&2
  .venv/bin/python -c "import sys; from lfm2_audio.serving.testing import make_tiny_checkpoint as m; m(sys.argv[1], sys.argv[2])" \
    "$out/random-tiny" tests/assets/tokenizer.json
  model_args=(--model "$out/random-tiny")
fi
question=tests/assets/question.wav
.venv/bin/lfm2-audio chat "$question" --out-dir "$out" --max-new-tokens 120 --seed 0 "${model_args[@]}"
.venv/bin/lfm2-audio asr "$question" --max-new-tokens 100 "${model_args[@]}"
.venv/bin/lfm2-audio tts "The quick brown fox jumps over the lazy dog." -o "$out/speech.wav" --max-new-tokens 120 --seed 0 "${model_args[@]}"
echo "demo: outputs in $out"
