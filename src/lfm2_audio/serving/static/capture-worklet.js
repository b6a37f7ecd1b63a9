// Microphone capture: hands the main thread mono float32 blocks of about 40 ms.
// An AudioWorklet runs on the audio thread, so capture never stalls behind the page's work.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = Math.round(sampleRate * 0.04);
    this.buf = new Float32Array(this.block);
    this.n = 0;
  }
  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const ch = input[0];
      for (let i = 0; i < ch.length; i++) {
        let v = 0;
        for (let c = 0; c < input.length; c++) v += input[c][i];  // mix to mono
        this.buf[this.n++] = v / input.length;
        if (this.n === this.block) {
          this.port.postMessage(this.buf);
          this.buf = new Float32Array(this.block);
          this.n = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("capture", Capture);
