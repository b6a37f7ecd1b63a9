#!/usr/bin/env bash
# The main job on the bundled demo model: answer a spoken question with text and speech,
# transcribe a clip, speak a sentence. WAV files go to out/demo/ (or $OUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
out=${OUT_DIR:-out/demo}
mkdir -p "$out"
examples=src/lfm2_audio/assets/examples
model_args=()
if [[ ! -f src/lfm2_audio/assets/demo-model/config.json ]]; then
  echo "demo: the bundled demo model is missing; using a tiny random-weight checkpoint (output is noise)" >&2
  .venv/bin/python -c "import sys; from lfm2_audio.serving.testing import make_tiny_checkpoint as m; m(sys.argv[1], sys.argv[2])" \
    "$out/random-tiny" tests/assets/tokenizer.json
  model_args=(--model "$out/random-tiny")
fi
echo "== chat: $examples/question.wav (\"Which day follows Thursday?\")"
.venv/bin/lfm2-audio chat "$examples/question.wav" --out-dir "$out" --max-new-tokens 200 --seed 0 "${model_args[@]}"
echo "== asr: $examples/sentence.wav (\"He opened the meeting with a long speech.\")"
.venv/bin/lfm2-audio asr "$examples/sentence.wav" --max-new-tokens 100 "${model_args[@]}"
echo "== tts"
.venv/bin/lfm2-audio tts "The quick brown fox jumps over the lazy dog." -o "$out/speech.wav" --voice us-female \
  --max-new-tokens 300 --seed 0 "${model_args[@]}"
echo "demo: outputs in $out"
