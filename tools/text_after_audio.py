"""How much a model's text after an interleaved audio run leans on the codes of that run.

Teacher-forced text accuracy (argmax) on a precomputed validation set, for text targets right
after an interleaved audio run (an audio-out frame that is not end-of-audio), after an
end-of-audio frame (the turn's end) and after a text token: with the true output codes as input,
with every output frame replaced by the model's own sample from the state before it (chat's audio
sampling, temperature 1 and top-4: one step ahead, `loss.own_codes`), and with random codes. A
large drop after a run means the text that follows it leans on its codes; generating, those
are the model's own samples.

    python tools/text_after_audio.py MODEL_DIR [--data data/demo/samples/val] [--rows 32]
"""

import argparse

import torch

from lfm2_audio.config import END_OF_AUDIO, MODALITY_AUDIO_OUT, MODALITY_TEXT
from lfm2_audio.model.lfm2_audio import LFM2AudioModel
from lfm2_audio.training.data import SampleStore, collate, pack_rows
from lfm2_audio.generation.sampling import CHAT_AUDIO
from lfm2_audio.training.loss import backbone_states, own_codes


def text_accuracy(model, store, rows, code_noise: float, own: bool = False, batch_rows: int = 4) -> dict:
    right = {"after_audio_run": 0, "after_end_of_audio": 0, "after_text": 0}
    total = dict(right)
    for i in range(0, len(rows), batch_rows):
        b = collate([[store[j] for j in row] for row in rows[i : i + batch_rows]])
        B, L = b.modality.shape
        enc, h = backbone_states(model, b, code_noise)
        if own:
            _, h = backbone_states(model, b, codes_in=own_codes(model, b, h, 1.0, CHAT_AUDIO), enc=enc)
        text_sel, _ = b.targets()
        ids = torch.zeros(B, L, dtype=torch.long)
        ids[b.modality == MODALITY_TEXT] = b.text
        first_code = torch.full((B, L), -1, dtype=torch.long)
        first_code[b.modality == MODALITY_AUDIO_OUT] = b.audio_out[:, 0]
        hit = model.text_logits(h[:, :-1][text_sel]).argmax(-1) == ids[:, 1:][text_sel]
        before, code = b.modality[:, :-1][text_sel], first_code[:, :-1][text_sel]
        places = {"after_audio_run": (before == MODALITY_AUDIO_OUT) & (code != END_OF_AUDIO),
                  "after_end_of_audio": code == END_OF_AUDIO, "after_text": before == MODALITY_TEXT}
        for name, where in places.items():
            right[name] += int(hit[where].sum())
            total[name] += int(where.sum())
    return {k: (right[k] / max(total[k], 1), total[k]) for k in right}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="data/demo/samples/val")
    ap.add_argument("--rows", type=int, default=32, help="packed rows of 1,024 positions")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LFM2AudioModel.from_pretrained(args.model, dtype=torch.float32).eval()
    store = SampleStore(args.data)
    rows = pack_rows(store.lengths, range(len(store)), 1024, 64)[: args.rows]
    with torch.no_grad():
        for label, noise, own in (("true codes", 0.0, False), ("own samples", 0.0, True), ("random codes", 1.0, False)):
            acc = text_accuracy(model, store, rows, noise, own)
            print(f"{label:>12}: " + ", ".join(f"{k} {a:.1%} of {n}" for k, (a, n) in acc.items()))


if __name__ == "__main__":
    main()
