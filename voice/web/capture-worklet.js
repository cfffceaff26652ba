// AudioWorklet: microphone audio at the context's rate -> 24 kHz pcm16, posted in 20 ms frames (480 samples).
// A windowed-sinc low-pass (cut a little below 12 kHz) then linear interpolation at the 24 kHz positions:
// plenty for speech, and it runs per block on the audio thread without allocation in the steady state.

const OUT_RATE = 24000;
const FRAME = 480;
const TAPS = 31;

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.filter = this.step > 1 ? lowpass(0.45 / this.step, TAPS) : null;
    this.history = new Float32Array(TAPS - 1); // filter state, the last TAPS-1 raw samples
    this.prev = 0; // the filtered sample before this block, for interpolation across blocks
    this.pos = 0; // next output position in filtered input samples, relative to this block's start
    this.frame = new Int16Array(FRAME);
    this.n = 0;
    this.active = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.active = false; };
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return this.active;
    const x = this.filter ? this.filtered(input) : input;
    // output positions are fractional indices into x; index -1 is this.prev
    while (this.pos < x.length - 1) {
      const i = Math.floor(this.pos), f = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      this.push(a + (x[i + 1] - a) * f);
      this.pos += this.step;
    }
    this.pos -= x.length;
    this.prev = x[x.length - 1];
    return this.active;
  }

  filtered(input) {
    const h = this.filter, hist = this.history, k = TAPS - 1;
    const out = new Float32Array(input.length);
    for (let n = 0; n < input.length; n++) {
      let acc = 0;
      for (let t = 0; t < TAPS; t++) {
        const j = n - t; // x[j], with j < 0 reaching into the history
        acc += h[t] * (j >= 0 ? input[j] : hist[k + j]);
      }
      out[n] = acc;
    }
    const all = new Float32Array(k + input.length);
    all.set(hist);
    all.set(input, k);
    this.history = all.slice(all.length - k);
    return out;
  }

  push(v) {
    this.frame[this.n++] = Math.max(-32768, Math.min(32767, Math.round(v * 32768)));
    if (this.n === FRAME) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.frame = new Int16Array(FRAME);
      this.n = 0;
    }
  }
}

// A Hann-windowed sinc low-pass with cutoff `fc` (cycles per input sample), unit gain at DC.
function lowpass(fc, taps) {
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const t = i - mid;
    const sinc = t === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * t) / (Math.PI * t);
    h[i] = sinc * (0.5 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)));
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

registerProcessor("capture-24k", Capture);
